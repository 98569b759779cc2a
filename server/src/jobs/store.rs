//! What a job store keeps and the narrow interface every backend offers:
//! record, look up, list, claim with a lease, renew it, report progress,
//! finish, hand back, cancel, and expire. Each write by a runner is fenced
//! by the job's attempt number: a front whose lease expired (and whose job
//! another front took over) changes nothing.
//!
//! Every backend reads a record from the same columns, in the same order
//! (`record_columns!`), and decodes them with its own driver.

use std::{collections::BTreeMap, time::Duration};

/// The columns a record is read from, in the order every backend's decoder
/// takes them, with `$input` and `$output` read in their places: the columns
/// themselves, or an empty value in the store's dialect when a lookup leaves
/// them out.
macro_rules! record_columns {
    ($input:literal, $output:literal) => {
        concat!(
            "id, task, mode, params, ",
            $input,
            ", client, idempotency_key, state, ",
            $output,
            ", error_code, error_message, progress, progress_message, attempts, cancel_requested, created_ms, \
             started_ms, finished_ms, seq, traceparent, interactive"
        )
    };
}
pub(crate) use record_columns;

use bytes::Bytes;

/// A job's state, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// Waiting for a front with room.
    Queued,
    /// A front runs it.
    Running,
    /// Done, with an output.
    Succeeded,
    /// Ended in failure.
    Failed,
    /// Cancelled before it finished.
    Cancelled,
}

impl State {
    /// Every state, in the API's order.
    pub const ALL: [State; 5] = [State::Queued, State::Running, State::Succeeded, State::Failed, State::Cancelled];

    /// The metrics' label.
    pub fn label(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Running => "running",
            State::Succeeded => "succeeded",
            State::Failed => "failed",
            State::Cancelled => "cancelled",
        }
    }

    /// The value stored, equal to the API's JobState number.
    pub fn number(self) -> i64 {
        match self {
            State::Queued => 1,
            State::Running => 2,
            State::Succeeded => 3,
            State::Failed => 4,
            State::Cancelled => 5,
        }
    }

    /// The state stored as `number`.
    pub fn from_number(number: i64) -> Option<Self> {
        Some(match number {
            1 => State::Queued,
            2 => State::Running,
            3 => State::Succeeded,
            4 => State::Failed,
            5 => State::Cancelled,
            _ => return None,
        })
    }

    /// Whether nothing more happens to the job.
    pub fn is_terminal(self) -> bool {
        matches!(self, State::Succeeded | State::Failed | State::Cancelled)
    }
}

/// A job to record.
#[derive(Debug, Clone, PartialEq)]
pub struct NewJob {
    /// Its id (unguessable).
    pub id: String,
    /// Its task.
    pub task: String,
    /// The raw ExecutionMode value asked for.
    pub mode: i32,
    /// Its params, sorted.
    pub params: BTreeMap<String, String>,
    /// Its input.
    pub input: Bytes,
    /// The submitting client's name: the authenticated client's, else the
    /// one its call claimed (`offload-client`, else its IP address).
    pub client: String,
    /// Runs are scheduled as its submitter's calls, at this priority.
    pub priority: crate::schedule::Priority,
    /// Submits with the same key and client return the same job.
    pub idempotency_key: Option<String>,
    /// The Submit's trace context (W3C), which the runs continue.
    pub traceparent: String,
}

impl NewJob {
    /// Whether `self` asks for the same work as the job `other` records.
    pub fn same_request(&self, other: &NewJob) -> bool {
        (self.task.as_str(), self.mode, &self.params, &self.input)
            == (other.task.as_str(), other.mode, &other.params, &other.input)
    }
}

/// Why a job failed or was cancelled: the status its call would have had.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobFailure {
    /// The gRPC status code.
    pub code: i32,
    /// Its message.
    pub message: String,
}

/// A job as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    /// What was submitted.
    pub job: NewJob,
    /// Where it stands.
    pub state: State,
    /// Its output, once it succeeded.
    pub output: Option<Bytes>,
    /// Why it failed or was cancelled.
    pub failure: Option<JobFailure>,
    /// Fraction done, and the task's note.
    pub progress: f64,
    /// The task's note with `progress`.
    pub progress_message: String,
    /// Runs started so far; also the fence of the current run's writes.
    pub attempts: u32,
    /// A cancel was asked while it ran.
    pub cancel_requested: bool,
    /// Unix milliseconds: recorded, last run started, finished.
    pub created_ms: i64,
    /// When its last run started.
    pub started_ms: Option<i64>,
    /// When it reached its terminal state.
    pub finished_ms: Option<i64>,
}

/// How a run ended, as its runner reports it.
#[derive(Debug, Clone)]
pub enum RunResult {
    /// The task's output.
    Succeeded(Bytes),
    /// The task failed, or the job's cancel stopped it.
    Ended(State, JobFailure),
}

impl RunResult {
    /// The state, output and failure it records.
    pub fn columns(&self) -> (State, Option<&[u8]>, Option<&JobFailure>) {
        match self {
            RunResult::Succeeded(output) => (State::Succeeded, Some(output.as_ref()), None),
            RunResult::Ended(state, failure) => (*state, None, Some(failure)),
        }
    }
}

/// The message of a job cancelled while queued.
pub const CANCELLED_QUEUED: &str = "cancelled before it ran";
/// The message of a job whose cancel was asked as its front handed it back.
pub const CANCELLED_HANDED_BACK: &str = "cancelled as its front stopped";
/// The message of a job whose cancel was asked and whose front was lost.
pub const CANCELLED_LOST: &str = "cancelled while its front was lost";
/// The start of the message of a job whose last attempt's front was lost;
/// the store appends "N of M".
pub const LOST_ON_ATTEMPT: &str = "its front stopped renewing its lease on attempt ";

/// A page of [`JobStore::list`].
#[derive(Debug, Clone, Default)]
pub struct Page {
    /// Newest first, inputs and outputs left out.
    pub jobs: Vec<JobRecord>,
    /// Where the next page starts, if there is one.
    pub next: Option<i64>,
}

impl Page {
    /// The page of `limit` jobs from `rows`, the jobs and their sequence
    /// numbers fetched with one more than `limit` (whose presence says
    /// there is a next page).
    pub fn of(mut rows: Vec<(JobRecord, i64)>, limit: usize) -> Self {
        let next = (rows.len() > limit).then(|| rows[limit - 1].1);
        rows.truncate(limit);
        Page { jobs: rows.into_iter().map(|(job, _)| job).collect(), next }
    }
}

/// Which jobs [`JobStore::list`] gives.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only jobs in this state.
    pub state: Option<State>,
    /// Only jobs this client submitted.
    pub client: Option<String>,
}

/// What a submit found.
#[derive(Debug, Clone)]
pub enum Submitted {
    /// Recorded now.
    New(JobRecord),
    /// The same key's job, already recorded.
    Existing(JobRecord),
}

/// A job to record, and how it starts.
#[derive(Debug, Clone)]
pub struct Submission {
    /// The job.
    pub job: NewJob,
    /// Queued, claimed at once, or already done.
    pub start: Start,
}

/// How a job starts when it is recorded.
#[derive(Debug, Clone, Default)]
pub enum Start {
    /// Queued, for any front to claim.
    #[default]
    Queued,
    /// Recorded as claimed by this front, under this lease (its first
    /// attempt): the front had room for it when it was submitted there, and
    /// nothing was queued before it.
    RunBy(Claimant),
    /// Recorded as succeeded with this output, never run (attempts 0): the
    /// result cache held the result of identical work.
    Succeeded(Bytes),
}

impl Start {
    /// The state it is recorded in.
    pub fn state(&self) -> State {
        match self {
            Start::Queued => State::Queued,
            Start::RunBy(_) => State::Running,
            Start::Succeeded(_) => State::Succeeded,
        }
    }

    /// The front that runs it at once, if one does.
    pub fn run_by(&self) -> Option<&Claimant> {
        match self {
            Start::RunBy(claimant) => Some(claimant),
            _ => None,
        }
    }

    /// Its output, if it is recorded done.
    pub fn output(&self) -> Option<&[u8]> {
        match self {
            Start::Succeeded(output) => Some(output),
            _ => None,
        }
    }
}

/// A front claiming jobs, and for how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimant {
    /// The front.
    pub owner: String,
    /// The claim's lease.
    pub lease: Duration,
}

impl From<NewJob> for Submission {
    fn from(job: NewJob) -> Self {
        Self { job, start: Start::Queued }
    }
}

/// Why the store could not do what was asked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database failed.
    #[error("job store: {0}")]
    Database(String),
}

/// A place jobs are kept. Writes are durable when they return. Times are
/// the store's own clock (the database server's, for a store shared by
/// several hosts), so that fronts on hosts whose clocks disagree still
/// agree on when a lease lapsed.
#[async_trait::async_trait]
pub trait JobStore: Send + Sync + std::fmt::Debug + 'static {
    /// Records `jobs` in one transaction (group commit), each as its
    /// [`Submission::start`] says; for a job whose idempotency key is
    /// taken by the same client, the job recorded under it instead.
    async fn submit(&self, jobs: Vec<Submission>) -> Result<Vec<Submitted>, StoreError>;

    /// The job `id`, its input left out (only the runner that claims a job
    /// reads its input, which may be large).
    async fn get(&self, id: &str) -> Result<Option<JobRecord>, StoreError>;

    /// The input of job `id`, if it is kept.
    async fn input(&self, id: &str) -> Result<Option<Bytes>, StoreError>;

    /// Up to `limit` jobs (in `state`, of `client`, if given), newest
    /// first, from `after` (a previous page's `next`) on.
    async fn list(&self, filter: &Filter, limit: usize, after: Option<i64>) -> Result<Page, StoreError>;

    /// Takes up to `limit` of the oldest queued jobs for `owner`, leased
    /// for `lease`, oldest first. Two fronts claiming at once never get the
    /// same job.
    async fn claim(&self, owner: &str, lease: Duration, limit: usize) -> Result<Vec<JobRecord>, StoreError>;

    /// Extends the lease of run `attempt` of `id` to `lease` from now;
    /// false if the run is no longer this runner's (its lease lapsed and
    /// the job moved on).
    async fn renew(&self, id: &str, attempt: u32, lease: Duration) -> Result<bool, StoreError>;

    /// Records run `attempt`'s progress (fenced, like every runner's write).
    async fn progress(&self, id: &str, attempt: u32, fraction: f64, message: &str) -> Result<bool, StoreError>;

    /// Ends `runs` in one transaction (group commit); for each, the job as
    /// it is now recorded (its input left out, as [`JobStore::get`]'s), or
    /// `None` if it was not the job's current run (nothing is written for
    /// it).
    async fn finish(&self, runs: Vec<Finished>) -> Result<Vec<Option<JobRecord>>, StoreError>;

    /// Hands run `attempt` back to the queue unfinished, not counted as an
    /// attempt (its front is shutting down); a job whose cancel was asked
    /// is cancelled instead.
    async fn release(&self, id: &str, attempt: u32) -> Result<bool, StoreError>;

    /// Cancels `id`: a queued job at once, a running one by flagging it for
    /// its runner. Returns the job as it is then.
    async fn cancel(&self, id: &str) -> Result<Option<JobRecord>, StoreError>;

    /// The runs of `owner` whose jobs were asked to cancel, as (id, attempt).
    async fn cancel_requests(&self, owner: &str) -> Result<Vec<(String, u32)>, StoreError>;

    /// Running jobs whose lease has ended: queued again if they have
    /// attempts left (up to `max_attempts`), cancelled if a cancel was
    /// asked, else failed. Returns how many were queued again.
    async fn expire_leases(&self, max_attempts: u32) -> Result<usize, StoreError>;

    /// Deletes jobs that finished `retention` ago or longer; returns how many.
    async fn delete_finished(&self, retention: Duration) -> Result<usize, StoreError>;

    /// How many jobs `client` has queued.
    async fn queued_of(&self, client: &str) -> Result<usize, StoreError>;

    /// How many jobs are in each state, and how long the oldest queued one
    /// has waited (for the metrics).
    async fn stats(&self) -> Result<Stats, StoreError>;

    /// Word of changes made by other fronts sharing the store, from a store
    /// that can tell (none: waiters and runners poll for them).
    fn notices(&self) -> Option<tokio::sync::mpsc::Receiver<Notice>> {
        None
    }
}

/// A change to a job made by another front.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// The job.
    pub id: String,
    /// What changed.
    pub kind: NoticeKind,
}

/// What a [`Notice`] says changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoticeKind {
    /// It is queued (new, handed back, or its front was lost): a runner
    /// with room may claim it.
    Queued,
    /// It runs and its cancel was asked: its runner stops it.
    CancelAsked,
    /// Anything else (its state, its progress).
    Changed,
    /// Notices may have been lost (the store's connection was down): any
    /// job may have changed. Its `id` is empty.
    Missed,
}

/// How one run ended, for [`JobStore::finish`].
#[derive(Debug, Clone)]
pub struct Finished {
    /// The job.
    pub id: String,
    /// The run (its attempt number).
    pub attempt: u32,
    /// How it ended.
    pub result: RunResult,
}

/// What the metrics show of a store.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    /// Jobs by state.
    pub by_state: Vec<(State, u64)>,
    /// How long the oldest queued job has waited.
    pub oldest_queued_age: Option<Duration>,
}

impl Stats {
    /// The stats of `counts` (state numbers and how many jobs are in each)
    /// and the oldest queued job's age in milliseconds.
    pub fn of(counts: Vec<(i64, i64)>, oldest_queued_ms: Option<i64>) -> Self {
        let by_state = counts
            .into_iter()
            .filter_map(|(state, count)| Some((State::from_number(state)?, count.max(0) as u64)))
            .collect();
        let oldest_queued_age = oldest_queued_ms.map(|ms| Duration::from_millis(ms.max(0) as u64));
        Stats { by_state, oldest_queued_age }
    }
}

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// `duration` in whole milliseconds, as stored.
pub fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}
