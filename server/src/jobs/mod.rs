//! Jobs: heavy work recorded durably and run by whichever front has room,
//! outliving the call that asked for it.
//!
//! - [`store`]: what is kept, and the narrow interface every store offers.
//! - [`sqlite`]: the embedded store, one SQLite file (the default).
//! - [`postgres`]: a PostgreSQL database shared by fronts on any number of
//!   hosts.
//! - [`conformance`]: what every store must do, checked by each one's tests.
//! - [`runner`]: a front's runner, which claims jobs when it has room and
//!   runs them through the dispatcher as batch calls, under a lease.
//! - [`service`]: the gRPC handlers of `offload.v1.Jobs`.
//!
//! [`Jobs`] is what the rest of the front holds: the store; concurrent
//! submits committed together (one fsync for a burst); and word of changes,
//! so that waiters and the runner hear of them at once: changes made by
//! this front, and those of other fronts when the store tells of them
//! (PostgreSQL's LISTEN/NOTIFY); else they are seen at the next poll.

pub mod conformance;
pub mod postgres;
pub mod runner;
pub mod service;
pub mod sqlite;
pub mod store;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::sync::{Notify, broadcast, mpsc, oneshot, watch};

use store::{Claimant, Finished, JobRecord, JobStore, NewJob, Notice, NoticeKind, StoreError, Submitted};

/// How jobs are kept and run.
#[derive(Debug, Clone)]
pub struct JobOptions {
    /// How long a claimed job's lease lasts without renewal.
    pub lease: Duration,
    /// Runs a job gets before a lost front fails it.
    pub max_attempts: u32,
    /// How long finished jobs are kept.
    pub retention: Duration,
    /// The largest output a job may keep.
    pub max_output_bytes: usize,
}

/// Writes of one kind waiting for their group commit, each with where its
/// outcome goes.
type Pending<T, R> = mpsc::Sender<(T, oneshot::Sender<Result<R, String>>)>;

/// Writes committed in one transaction at most.
const GROUP_COMMIT_MAX: usize = 256;

/// A front's view of its job store.
#[derive(Debug)]
pub struct Jobs {
    /// Where jobs are kept.
    pub store: Arc<dyn JobStore>,
    /// Where it is, for the log.
    pub description: String,
    /// How jobs are run.
    pub options: JobOptions,
    submits: Pending<store::Submission, Submitted>,
    finishes: Pending<Finished, Option<JobRecord>>,
    /// The waiters of each job being waited on: a change wakes only its
    /// own job's waiters, none missed between looks.
    waiting: Waiting,
    /// Ids of running jobs whose cancel was asked (here or on another front).
    cancels: broadcast::Sender<String>,
    /// A job was submitted here: the runner may have work.
    submitted: Notify,
    /// Jobs as this front last heard of them, for a Wait's first look.
    known: std::sync::Mutex<Known>,
    /// Room the runner offers for jobs submitted here.
    direct: std::sync::Mutex<Direct>,
}

/// Jobs submitted to a front with room run there at once: recorded as
/// claimed by its runner in the submit's own commit, they skip the queue
/// and the claim (a third of the store's writes per job, and one commit's
/// wait of their latency). The runner offers room only while its last claim
/// found nothing queued, so no job overtakes one queued before it; a front
/// with no room queues its jobs for whichever front has.
#[derive(Debug, Default)]
struct Direct {
    runner: Option<DirectRunner>,
    /// Jobs taken, not yet in the runner's hands: it counts them as running.
    in_transit: usize,
}

#[derive(Debug)]
struct DirectRunner {
    claimant: Claimant,
    /// How many more it takes.
    room: usize,
    to: mpsc::UnboundedSender<JobRecord>,
}

impl Direct {
    /// Takes room for up to `wanted` jobs: how many, and as whom.
    fn reserve(&mut self, wanted: usize) -> (usize, Option<Claimant>) {
        let Some(runner) = &mut self.runner else { return (0, None) };
        let taken = wanted.min(runner.room);
        runner.room -= taken;
        self.in_transit += taken;
        (taken, Some(runner.claimant.clone()))
    }

    /// Room taken for jobs that were not recorded as claimed.
    fn unreserve(&mut self, count: usize) {
        self.in_transit = self.in_transit.saturating_sub(count);
    }

    /// Hands `job`, recorded as claimed, to the runner: false if it stopped.
    fn deliver(&mut self, job: JobRecord) -> bool {
        self.runner.as_ref().is_some_and(|runner| runner.to.send(job).is_ok())
    }
}

/// Each waited job's channel to its waiters: the job as the change that
/// woke them left it, when the change came with it (a write that read it
/// back), so that they need not look it up; else `None`, and they do.
type Waiting = Arc<std::sync::Mutex<HashMap<String, watch::Sender<Option<Arc<JobRecord>>>>>>;

/// Where the embedded store lives by default: the user's state folder
/// (`$XDG_STATE_HOME/offload`, else `~/.local/state/offload`).
pub fn default_store_path() -> PathBuf {
    let state = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".local/state")));
    match state {
        Some(dir) => dir.join("offload/jobs.sqlite3"),
        None => PathBuf::from("offload-jobs.sqlite3"),
    }
}

impl Jobs {
    /// Opens the store `spec` names: a `postgres://` (or `postgresql://`)
    /// URL, else a file path (`sqlite:` may precede it).
    pub async fn open(spec: &str, options: JobOptions) -> Result<Arc<Self>, StoreError> {
        if crate::pg::is_url(spec) {
            let store = postgres::PgStore::connect(spec).await?;
            let description = format!("PostgreSQL database {}", store.describe());
            return Ok(Self::with_store(Arc::new(store), description, options));
        }
        let path = PathBuf::from(spec.strip_prefix("sqlite:").unwrap_or(spec));
        let store = tokio::task::spawn_blocking(move || sqlite::SqliteStore::open(&path))
            .await
            .map_err(|e| StoreError::Database(e.to_string()))??;
        let description = format!("SQLite file {}", store.path().display());
        Ok(Self::with_store(Arc::new(store), description, options))
    }

    /// Jobs kept in `store`.
    pub fn with_store(store: Arc<dyn JobStore>, description: String, options: JobOptions) -> Arc<Self> {
        let notices = store.notices();
        let jobs = Arc::new_cyclic(|jobs: &std::sync::Weak<Self>| {
            let jobs = jobs.clone();
            let submits = group_commit(move |group| {
                let jobs = jobs.clone();
                Box::pin(async move {
                    match jobs.upgrade() {
                        Some(jobs) => jobs.record(group).await,
                        None => Err(StoreError::Database("the job store closed".into())),
                    }
                })
            });
            let finishing = Arc::clone(&store);
            let finishes = group_commit(move |runs| {
                let store = Arc::clone(&finishing);
                Box::pin(async move { store.finish(runs).await })
            });
            Self {
                store,
                description,
                options,
                submits,
                finishes,
                waiting: Arc::default(),
                cancels: broadcast::channel(1024).0,
                submitted: Notify::new(),
                known: std::sync::Mutex::default(),
                direct: std::sync::Mutex::default(),
            }
        });
        if let Some(notices) = notices {
            tokio::spawn(relay(Arc::downgrade(&jobs), notices));
        }
        jobs
    }

    /// Tells this front's waiters of `id` that it changed.
    fn touched(&self, id: &str) {
        self.known().forget(id);
        self.tell(id, || None);
    }

    /// Tells this front's waiters of `job` that it changed, and how it is
    /// now. Only for a job's current state: a record read back by the write
    /// that made it, told of by the run that made it, in its order.
    fn changed_to(&self, job: &JobRecord) {
        self.now_is(without_input(job));
    }

    fn now_is(&self, job: Arc<JobRecord>) {
        self.known().update(&job);
        let id = job.job.id.clone();
        self.tell(&id, || Some(job));
    }

    /// Forgets what this front knew of every job, and wakes every waiter to
    /// look again: changes may have been made that it was not told of.
    pub(crate) fn touched_all(&self) {
        self.known().clear();
        for waiters in self.waiting.lock().unwrap_or_else(|e| e.into_inner()).values() {
            waiters.send_replace(None);
        }
    }

    fn known(&self) -> std::sync::MutexGuard<'_, Known> {
        self.known.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Job `id` as it is now, if this front knows it without asking the
    /// store: it made or heard of the job's last change, and every later
    /// change will be told to a watch begun before this call. `None`: look
    /// it up.
    pub fn known_now(&self, id: &str) -> Option<Arc<JobRecord>> {
        self.known().get(id)
    }

    fn tell(&self, id: &str, now: impl FnOnce() -> Option<Arc<JobRecord>>) {
        if let Some(waiters) = self.waiting.lock().unwrap_or_else(|e| e.into_inner()).get(id) {
            waiters.send_replace(now());
        }
    }

    /// Records `job` durably (with other submits of the moment): queued,
    /// or done with `output` when the result cache held it.
    pub async fn submit(&self, job: NewJob, output: Option<bytes::Bytes>) -> Result<Submitted, StoreError> {
        let start = output.map_or(store::Start::Queued, store::Start::Succeeded);
        committed(&self.submits, store::Submission { job, start }).await
    }

    /// Records a group of submits, those the runner has room for as claimed
    /// by it, and tells of them: waiters first, then the runner (so that no
    /// waiter hears of a job's start after its end). Runs in the group
    /// commit's task: a submitter that goes away cannot strand a job
    /// recorded as claimed.
    async fn record(&self, mut group: Vec<store::Submission>) -> Result<Vec<Submitted>, StoreError> {
        let to_run = group.iter().filter(|s| matches!(s.start, store::Start::Queued)).count();
        let (reserved, claimant) = self.direct().reserve(to_run);
        if let Some(claimant) = claimant {
            let queued = group.iter_mut().filter(|s| matches!(s.start, store::Start::Queued));
            for submission in queued.take(reserved) {
                submission.start = store::Start::RunBy(claimant.clone());
            }
        }
        let mut recorded = self.store.submit(group).await;
        let mut delivered = 0;
        for submitted in recorded.iter_mut().flatten() {
            let Submitted::New(record) = submitted else { continue };
            let now = without_input(record);
            self.known().insert(&now);
            self.now_is(now);
            match record.state {
                store::State::Queued => self.submitted.notify_one(),
                store::State::Running if self.direct().deliver(record.clone()) => {
                    delivered += 1;
                    // Its submitter is told it is queued, as the API promises: it
                    // waits for this front's executors, and its run is yet to
                    // start. Its waiters see it running, then done.
                    record.state = store::State::Queued;
                    record.attempts = 0;
                    record.started_ms = None;
                }
                store::State::Running => {
                    // The runner stopped meanwhile: the job is queued again,
                    // for a front that runs (this attempt not counted).
                    match self.store.release(&record.job.id, record.attempts).await {
                        Ok(_) => self.touched(&record.job.id),
                        Err(err) => tracing::warn!(job.id = %record.job.id, error = %err, "cannot hand a job back"),
                    }
                }
                // Done at submit (the result cache held its result): nothing runs.
                _ => {}
            }
        }
        if reserved > delivered {
            self.direct().unreserve(reserved - delivered);
            self.submitted.notify_one();
        }
        recorded
    }

    fn direct(&self) -> std::sync::MutexGuard<'_, Direct> {
        self.direct.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Jobs submitted here that the runner will run at once, as `claimant`,
    /// while it offers room (see [`Direct`]).
    pub(crate) fn run_submitted(&self, claimant: Claimant) -> mpsc::UnboundedReceiver<JobRecord> {
        let (to, from) = mpsc::unbounded_channel();
        *self.direct() = Direct { runner: Some(DirectRunner { claimant, room: 0, to }), in_transit: 0 };
        from
    }

    /// Offers `room` for jobs submitted here from now on (0: none); returns
    /// how many were taken and are still on their way to the runner.
    pub(crate) fn offer_room(&self, room: usize) -> usize {
        let mut direct = self.direct();
        if let Some(runner) = &mut direct.runner {
            runner.room = room;
        }
        direct.in_transit
    }

    /// A job taken at submit reached the runner.
    pub(crate) fn arrived(&self) {
        let mut direct = self.direct();
        direct.in_transit = direct.in_transit.saturating_sub(1);
    }

    /// The runner stops: it takes no more jobs at submit.
    pub(crate) fn stop_running_submitted(&self) {
        self.direct().runner = None;
    }

    /// Records how run `attempt` of `id` ended (with other runs ending at
    /// the moment), and tells its waiters: false if it is no longer the
    /// job's current run.
    pub async fn finish(&self, id: &str, attempt: u32, result: store::RunResult) -> Result<bool, StoreError> {
        let ended = committed(&self.finishes, Finished { id: id.to_string(), attempt, result }).await?;
        if let Some(job) = &ended {
            self.changed_to(job);
        }
        Ok(ended.is_some())
    }

    /// Cancels `id` (see [`JobStore::cancel`]).
    pub async fn cancel(&self, id: &str) -> Result<Option<JobRecord>, StoreError> {
        let job = self.store.cancel(id).await?;
        self.touched(id);
        if job.as_ref().is_some_and(|job| job.cancel_requested && job.state == store::State::Running) {
            let _ = self.cancels.send(id.to_string());
        }
        Ok(job)
    }

    /// Word of running jobs whose cancel is asked from now on.
    pub fn cancels(&self) -> broadcast::Receiver<String> {
        self.cancels.subscribe()
    }

    /// Word of changes to job `id` from now on (made here, or told of by
    /// the store).
    pub fn watch(&self, id: &str) -> Watch {
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        let changes = waiting.entry(id.to_string()).or_insert_with(|| watch::channel(None).0).subscribe();
        Watch { id: id.to_string(), changes, waiting: Arc::clone(&self.waiting) }
    }
}

/// Jobs as this front last heard of them, the most recently submitted
/// here kept: a Wait that follows its own Submit (the usual pattern) starts
/// without a lookup. An entry is replaced by each change this front makes
/// or reads back, and dropped at word of a change it did not see.
#[derive(Debug, Default)]
struct Known {
    jobs: HashMap<String, Arc<JobRecord>>,
    /// Ids in the order they were first known, for evicting the oldest.
    order: std::collections::VecDeque<String>,
}

/// `job` without its input, which no waiter is shown.
fn without_input(job: &JobRecord) -> Arc<JobRecord> {
    Arc::new(JobRecord { job: NewJob { input: bytes::Bytes::new(), ..job.job.clone() }, ..job.clone() })
}

/// Jobs [`Known`] keeps at most.
const KNOWN_MAX: usize = 4096;
/// The largest output [`Known`] keeps (a larger one is looked up).
const KNOWN_OUTPUT_MAX: usize = 16 * 1024;

impl Known {
    fn insert(&mut self, job: &Arc<JobRecord>) {
        if self.jobs.contains_key(&job.job.id) {
            return;
        }
        while self.order.len() >= KNOWN_MAX {
            if let Some(oldest) = self.order.pop_front() {
                self.jobs.remove(&oldest);
            }
        }
        self.order.push_back(job.job.id.clone());
        self.jobs.insert(job.job.id.clone(), Arc::clone(job));
    }

    /// Takes `job` as its id's current state, if the id is kept.
    fn update(&mut self, job: &Arc<JobRecord>) {
        let small = job.output.as_ref().is_none_or(|output| output.len() <= KNOWN_OUTPUT_MAX);
        match self.jobs.get_mut(&job.job.id) {
            Some(known) if small => *known = Arc::clone(job),
            Some(_) => self.forget(&job.job.id),
            None => {}
        }
    }

    /// Drops `id` (its id stays in `order` until its turn, as a no-op).
    fn forget(&mut self, id: &str) {
        self.jobs.remove(id);
    }

    fn get(&self, id: &str) -> Option<Arc<JobRecord>> {
        self.jobs.get(id).cloned()
    }

    fn clear(&mut self) {
        self.jobs.clear();
        self.order.clear();
    }
}

/// A waiter's view of one job's changes; the job is forgotten once its last
/// waiter is gone.
#[derive(Debug)]
pub struct Watch {
    id: String,
    changes: watch::Receiver<Option<Arc<JobRecord>>>,
    waiting: Waiting,
}

impl Watch {
    /// Returns once the job changed since the last call (or since the
    /// watch began): the job as it is now, if the change told (else look
    /// it up).
    pub async fn changed(&mut self) -> Option<Arc<JobRecord>> {
        // The sender lives while this receiver does (it is removed only
        // when the last receiver goes), so this never fails.
        let _ = self.changes.changed().await;
        self.changes.borrow_and_update().clone()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        // This receiver still counts: the last one sees a count of one.
        if waiting.get(&self.id).is_some_and(|waiters| waiters.receiver_count() <= 1) {
            waiting.remove(&self.id);
        }
    }
}

/// Commits writes in groups: whatever arrived while the last commit ran goes
/// into the next one, so a burst costs a few syncs to disk, not one each,
/// and none is acknowledged before it is durable. The writer stops when the
/// front drops its sender.
fn group_commit<T, R>(
    commit: impl Fn(Vec<T>) -> futures::future::BoxFuture<'static, Result<Vec<R>, StoreError>> + Send + 'static,
) -> Pending<T, R>
where
    T: Send + 'static,
    R: Send + 'static,
{
    let (sender, mut pending) = mpsc::channel::<(T, oneshot::Sender<Result<R, String>>)>(4 * GROUP_COMMIT_MAX);
    tokio::spawn(async move {
        let mut batch = Vec::new();
        while pending.recv_many(&mut batch, GROUP_COMMIT_MAX).await > 0 {
            let (writes, replies): (Vec<T>, Vec<_>) = std::mem::take(&mut batch).into_iter().unzip();
            match commit(writes).await {
                Ok(outcomes) => {
                    for (reply, outcome) in replies.into_iter().zip(outcomes) {
                        let _ = reply.send(Ok(outcome));
                    }
                }
                Err(err) => {
                    for reply in replies {
                        let _ = reply.send(Err(err.to_string()));
                    }
                }
            }
        }
    });
    sender
}

/// `write`'s outcome once its group is committed.
async fn committed<T, R>(pending: &Pending<T, R>, write: T) -> Result<R, StoreError> {
    let closed = || StoreError::Database("the job store closed".into());
    let (reply, answer) = oneshot::channel();
    pending.send((write, reply)).await.map_err(|_| closed())?;
    answer.await.map_err(|_| closed())?.map_err(StoreError::Database)
}

/// Passes word of other fronts' changes on to this front's waiters, and to
/// its runner when a job is queued.
async fn relay(jobs: std::sync::Weak<Jobs>, mut notices: mpsc::Receiver<Notice>) {
    while let Some(Notice { id, kind }) = notices.recv().await {
        let Some(jobs) = jobs.upgrade() else { return };
        if kind == NoticeKind::Missed {
            jobs.touched_all();
            jobs.submitted.notify_one();
            continue;
        }
        jobs.touched(&id);
        match kind {
            NoticeKind::Queued => jobs.submitted.notify_one(),
            NoticeKind::CancelAsked => drop(jobs.cancels.send(id)),
            NoticeKind::Changed | NoticeKind::Missed => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_waiter_hears_only_its_own_job_and_is_forgotten_when_gone() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = Jobs::open(dir.path().join("jobs.sqlite3").to_str().unwrap(), options()).await.unwrap();
        let (mut a, mut also_a) = (jobs.watch("a"), jobs.watch("a"));
        let mut b = jobs.watch("b");
        jobs.touched("a");
        // A change made before the waiter looks again is not lost.
        tokio::time::timeout(Duration::from_secs(5), a.changed()).await.expect("a's change");
        tokio::time::timeout(Duration::from_secs(5), also_a.changed()).await.expect("a's change, for each waiter");
        let nothing = tokio::time::timeout(Duration::from_millis(50), b.changed()).await;
        assert!(nothing.is_err(), "b did not change");
        drop((a, also_a));
        assert_eq!(jobs.waiting.lock().unwrap().keys().collect::<Vec<_>>(), ["b"], "a is forgotten");
    }

    #[tokio::test]
    async fn a_job_submitted_while_the_runner_has_room_goes_straight_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = Jobs::open(dir.path().join("jobs.sqlite3").to_str().unwrap(), options()).await.unwrap();
        let claimant = Claimant { owner: "front".into(), lease: Duration::from_secs(30) };
        let mut runner = jobs.run_submitted(claimant);
        let new = |id: &str| conformance::job(id, None);
        assert_eq!(jobs.offer_room(1), 0, "none on the way");
        let Submitted::New(a) = jobs.submit(new("a"), None).await.unwrap() else { panic!("new") };
        assert_eq!((a.state, a.attempts), (store::State::Queued, 0), "its submitter is told it is queued");
        let taken = runner.try_recv().expect("handed to the runner");
        assert_eq!((taken.job.id.as_str(), taken.state, taken.attempts), ("a", store::State::Running, 1));
        assert_eq!(taken.job.input, conformance::job("a", None).input, "with its input");
        assert_eq!(jobs.offer_room(0), 1, "on its way until the runner says it arrived");
        jobs.arrived();
        // No room left: queued, for whichever front claims it.
        jobs.submit(new("b"), None).await.unwrap();
        assert!(runner.try_recv().is_err());
        assert_eq!(jobs.store.get("b").await.unwrap().unwrap().state, store::State::Queued);
        // A stopped runner takes none.
        jobs.stop_running_submitted();
        assert_eq!(jobs.offer_room(5), 0);
        jobs.submit(new("c"), None).await.unwrap();
        assert_eq!(jobs.store.get("c").await.unwrap().unwrap().state, store::State::Queued);
    }

    fn options() -> JobOptions {
        JobOptions {
            lease: Duration::from_secs(30),
            max_attempts: 3,
            retention: Duration::from_secs(60),
            max_output_bytes: 1 << 20,
        }
    }

    #[test]
    fn known_jobs_are_bounded_and_dropped_at_word_of_an_unseen_change() {
        let record = |id: &str, output: usize| {
            let mut job = queued_record(id);
            job.output = Some(bytes::Bytes::from(vec![0; output]));
            Arc::new(job)
        };
        let mut known = Known::default();
        for n in 0..=KNOWN_MAX {
            known.insert(&record(&format!("j{n}"), 0));
        }
        assert!(known.get("j0").is_none(), "the oldest goes first");
        assert!(known.get(&format!("j{KNOWN_MAX}")).is_some());
        assert_eq!(known.jobs.len(), KNOWN_MAX);
        known.update(&record("elsewhere", 0));
        assert!(known.get("elsewhere").is_none(), "a change to a job not kept does not add it");
        known.update(&record("j1", 3));
        assert_eq!(known.get("j1").unwrap().output.as_ref().map(|o| o.len()), Some(3), "a change replaces it");
        known.update(&record("j1", KNOWN_OUTPUT_MAX + 1));
        assert!(known.get("j1").is_none(), "a large output is looked up, not kept");
        known.forget("j2");
        assert!(known.get("j2").is_none());
    }

    fn queued_record(id: &str) -> JobRecord {
        JobRecord {
            job: conformance::job(id, None),
            state: store::State::Queued,
            output: None,
            failure: None,
            progress: 0.0,
            progress_message: String::new(),
            attempts: 0,
            cancel_requested: false,
            created_ms: 0,
            started_ms: None,
            finished_ms: None,
        }
    }
}
