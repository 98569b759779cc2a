//! The embedded job store: one SQLite file on local disk, needing no set-up.
//! SQLite because it is transactional, survives a crash of the process at
//! any point (each commit of a submit or a result is synced to disk, its
//! write-ahead log by the store's syncer, before its calls are answered, so
//! an acknowledged Submit and a recorded result also survive a power loss
//! of the host), can be opened
//! by several processes of one host (replicas) at once, and can be
//! inspected with the `sqlite3` shell. It is bundled (compiled in), so
//! nothing needs installing. Claims, renewals and progress are not synced
//! on their own (see `SqliteStore::unsynced`).
//!
//! One connection on one thread of its own serves every call, one after
//! the other: calls from many blocking-pool threads fought over a lock, and
//! the thread switches cost more than the queries; a second connection (for
//! unsynced commits) emptied the first's page cache at each of its commits,
//! as SQLite does when another connection wrote. The thread commits every
//! call that came while it was busy in one transaction (group commit of
//! submits, claims and finishes together: one sync for them all), each
//! call in a savepoint of its own so that one failing undoes only itself,
//! and answers none before that transaction is committed.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
        mpsc,
    },
    time::Duration,
};

use bytes::Bytes;
use rusqlite::{Connection, OptionalExtension, Row, params};

use crate::schedule::Priority;

use super::store::{
    CANCELLED_HANDED_BACK, CANCELLED_LOST, CANCELLED_QUEUED, Filter, Finished, JobFailure, JobRecord, JobStore,
    LOST_ON_ATTEMPT, NewJob, Page, Start, State, Stats, StoreError, Submission, Submitted, millis, now_ms,
    record_columns,
};

impl From<rusqlite::Error> for StoreError {
    fn from(err: rusqlite::Error) -> Self {
        StoreError::Database(err.to_string())
    }
}

/// Jobs in a SQLite file.
#[derive(Debug)]
pub struct SqliteStore {
    path: PathBuf,
    /// Calls for the store's thread, which owns the connection.
    db: mpsc::Sender<Call>,
}

/// A call for the store's thread. It runs inside the thread's transaction
/// (or is given why there is none) and returns how to answer its caller
/// once that transaction is committed (or is given why it was not).
struct Call {
    commits: Commits,
    run: Run,
}

/// A call's work: given the connection (or why there is none) and the
/// time, it returns its answer.
type Run = Box<dyn FnOnce(Result<&mut Connection, &StoreError>, i64) -> Answer + Send>;

/// Answers a call's caller, once its transaction's commit is known.
type Answer = Box<dyn FnOnce(Option<&StoreError>) + Send>;

/// Calls committed together at most.
const CALLS_PER_COMMIT: usize = 512;

/// The store's connection, on the store's thread.
struct Db {
    connection: Connection,
    /// Where answers go once what they answer is on disk.
    syncer: Syncer,
}

/// What a call's commits need of the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Commits {
    /// On disk before the call returns.
    Synced,
    /// Not synced on their own (see `SqliteStore::unsynced`).
    Unsynced,
    /// None: the call only reads.
    None,
}

impl Db {
    /// Serves calls until the store is dropped: the calls waiting when the
    /// thread is free are run in one transaction, whose answers then wait
    /// for the syncer if they need the disk.
    fn serve(mut self, calls: mpsc::Receiver<Call>) {
        while let Ok(first) = calls.recv() {
            let mut batch = vec![first];
            while batch.len() < CALLS_PER_COMMIT
                && let Ok(next) = calls.try_recv()
            {
                batch.push(next);
            }
            let writes = batch.iter().any(|call| call.commits != Commits::None);
            let synced = batch.iter().any(|call| call.commits == Commits::Synced);
            let began = self.begin(writes);
            let now = now_ms();
            let answers: Vec<(Commits, Answer)> = batch
                .into_iter()
                .map(|call| match &began {
                    Ok(()) => (call.commits, (call.run)(Ok(&mut self.connection), now)),
                    Err(err) => (call.commits, (call.run)(Err(err), now)),
                })
                .collect();
            // Calls that could not begin were told why; nothing to commit.
            match began.and_then(|()| self.end()) {
                Ok(()) => {
                    // A claim, a renewal or progress needs no sync, and
                    // shows nothing a caller could take for recorded: it
                    // need not wait for others' syncs either (a job run
                    // before its submit is on disk is lost with it, result
                    // and all, in a power cut).
                    let (now, later): (Vec<_>, Vec<_>) =
                        answers.into_iter().partition(|(commits, _)| *commits == Commits::Unsynced);
                    now.into_iter().for_each(|(_, answer)| answer(None));
                    self.syncer.answer(later.into_iter().map(|(_, answer)| answer).collect(), synced);
                }
                Err(err) => answers.into_iter().for_each(|(_, answer)| answer(Some(&err))),
            }
        }
    }

    /// Begins a transaction, taking the write lock at once if it `writes`
    /// (so that replicas' writes queue for it rather than fail).
    fn begin(&mut self, writes: bool) -> Result<(), StoreError> {
        let begin = if writes { "BEGIN IMMEDIATE" } else { "BEGIN" };
        self.connection.prepare_cached(begin)?.execute([])?;
        Ok(())
    }

    /// Commits the transaction, or undoes it if it cannot be.
    fn end(&mut self) -> Result<(), StoreError> {
        let committed = self.connection.prepare_cached("COMMIT").and_then(|mut commit| commit.execute([]));
        if committed.is_err() && !self.connection.is_autocommit() {
            let _ = self.connection.execute_batch("ROLLBACK");
        }
        Ok(committed.map(drop)?)
    }
}

/// Group commit across transactions. SQLite, left to itself, would sync its
/// log at each commit (`synchronous = FULL`), and the store's thread would
/// wait for each sync, one after the other. Instead commits are written
/// unsynced (`synchronous = NORMAL`) and the syncer, on a thread of its
/// own, syncs the log (`fdatasync` of the `-wal` file: what FULL does)
/// once for every commit written meanwhile, then answers their calls; the
/// store's thread goes on with the next calls as it syncs.
///
/// Answers are given in the order of their commits, so none reveals a
/// write that is not yet on disk; an answer with nothing before it to wait
/// for is given at once.
struct Syncer {
    queue: mpsc::Sender<(Vec<Answer>, bool)>,
    /// Groups of answers given to the syncer and not yet answered.
    outstanding: Arc<AtomicUsize>,
}

impl Syncer {
    /// Starts the syncer of the database at `path`'s log.
    fn start(path: &Path) -> Result<Self, StoreError> {
        let mut log = path.as_os_str().to_owned();
        log.push("-wal");
        let log = PathBuf::from(log);
        let (queue, received) = mpsc::channel::<(Vec<Answer>, bool)>();
        let outstanding = Arc::new(AtomicUsize::new(0));
        let done = Arc::clone(&outstanding);
        std::thread::Builder::new()
            .name("offload-jobs-sync".into())
            .spawn(move || {
                // Opened at the first sync, when the log surely exists; the
                // store's connection keeps it from being deleted after.
                let mut file: Option<std::fs::File> = None;
                while let Ok(first) = received.recv() {
                    let mut groups = vec![first];
                    groups.extend(received.try_iter());
                    let synced = if groups.iter().any(|(_, synced)| *synced) { sync(&mut file, &log) } else { Ok(()) };
                    let count = groups.len();
                    for answer in groups.into_iter().flat_map(|(answers, _)| answers) {
                        answer(synced.as_ref().err());
                    }
                    done.fetch_sub(count, Ordering::AcqRel);
                }
            })
            .map_err(|e| StoreError::Database(format!("cannot start the store's syncer: {e}")))?;
        Ok(Self { queue, outstanding })
    }

    /// Answers `answers` once their commit is on disk, if it is `synced`,
    /// and once every earlier commit that needed the disk is.
    fn answer(&self, answers: Vec<Answer>, synced: bool) {
        if !synced && (answers.is_empty() || self.outstanding.load(Ordering::Acquire) == 0) {
            return answers.into_iter().for_each(|answer| answer(None));
        }
        self.outstanding.fetch_add(1, Ordering::AcqRel);
        if let Err(mpsc::SendError((answers, _))) = self.queue.send((answers, synced)) {
            let gone = StoreError::Database("the store's syncer is gone".into());
            answers.into_iter().for_each(|answer| answer(Some(&gone)));
        }
    }
}

/// Syncs the log at `path` to disk.
fn sync(file: &mut Option<std::fs::File>, path: &Path) -> Result<(), StoreError> {
    let failed = |e: std::io::Error| StoreError::Database(format!("cannot sync {}: {e}", path.display()));
    if file.is_none() {
        *file = Some(std::fs::File::open(path).map_err(failed)?);
    }
    file.as_ref().map_or(Ok(()), |file| file.sync_data().map_err(failed))
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    task TEXT NOT NULL,
    mode INTEGER NOT NULL,
    params TEXT NOT NULL,
    input BLOB NOT NULL,
    client TEXT NOT NULL,
    idempotency_key TEXT,
    state INTEGER NOT NULL,
    output BLOB,
    error_code INTEGER,
    error_message TEXT,
    progress REAL NOT NULL DEFAULT 0,
    progress_message TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0,
    owner TEXT,
    lease_until INTEGER,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    created_ms INTEGER NOT NULL,
    started_ms INTEGER,
    finished_ms INTEGER,
    traceparent TEXT NOT NULL DEFAULT '',
    interactive INTEGER NOT NULL DEFAULT 0,
    UNIQUE (client, idempotency_key)
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, seq);
CREATE INDEX IF NOT EXISTS jobs_by_owner ON jobs (owner) WHERE owner IS NOT NULL;
";

/// Every column of a record, in [`record`]'s order.
const COLUMNS: &str = record_columns!("input", "output");
/// The same, the input left out (for looking a job up).
const GET_COLUMNS: &str = record_columns!("X''", "output");
/// The same, inputs and outputs left out (for listing).
const LIST_COLUMNS: &str = record_columns!("X''", "NULL");

const QUEUED: i64 = 1;
const RUNNING: i64 = 2;

impl SqliteStore {
    /// Opens (creating if need be) the store at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::Database(format!("cannot create {}: {e}", dir.display())))?;
        }
        let db = Connection::open(path)?;
        // Several processes (replicas) may share the file: writers wait for
        // each other rather than fail.
        db.busy_timeout(Duration::from_secs(10))?;
        // Every statement the store runs stays prepared (parsing them each
        // time cost more than running them)...
        db.set_prepared_statement_cache_capacity(64);
        // ... and keeps its plan whatever values are bound: without this, a
        // statement whose plan a bound value might change (here, by a
        // partial index) is compiled again at each new value.
        db.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        // Commits are synced by the store's syncer, not by SQLite.
        db.pragma_update(None, "synchronous", "NORMAL")?;
        // Each call's savepoint keeps what it changed in a journal of its
        // own until the transaction ends: in memory, not a file per call.
        db.pragma_update(None, "temp_store", "MEMORY")?;
        db.execute_batch(SCHEMA)?;
        // Columns added since the table was first made (a file kept across
        // upgrades): none is ever removed or renamed.
        for (column, definition) in
            [("traceparent", "TEXT NOT NULL DEFAULT ''"), ("interactive", "INTEGER NOT NULL DEFAULT 0")]
        {
            let present: bool =
                db.query_row("SELECT COUNT(*) FROM pragma_table_info('jobs') WHERE name = ?1", [column], |row| {
                    row.get(0)
                })?;
            if !present {
                db.execute_batch(&format!("ALTER TABLE jobs ADD COLUMN {column} {definition}"))?;
            }
        }
        let db = Db { connection: db, syncer: Syncer::start(path)? };
        let (calls, received) = mpsc::channel();
        std::thread::Builder::new()
            .name("offload-jobs-db".into())
            .spawn(move || db.serve(received))
            .map_err(|e| StoreError::Database(format!("cannot start the store's thread: {e}")))?;
        Ok(Self { path: path.to_owned(), db: calls })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `work` on the store's thread, its commits synced: each blocks
    /// on the disk (it waits for its fsync).
    async fn with<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Connection, i64) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.on(Commits::Synced, work).await
    }

    /// Runs `work`, which only reads, on the store's thread.
    async fn read<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Connection, i64) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.on(Commits::None, work).await
    }

    /// Runs `work` on the store's thread, its commits as `commits` says.
    async fn on<T: Send + 'static>(
        &self,
        commits: Commits,
        work: impl FnOnce(&mut Connection, i64) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (done, outcome) = tokio::sync::oneshot::channel();
        let run = move |db: Result<&mut Connection, &StoreError>, now| -> Answer {
            let result = match db {
                // A panic is kept to this call (its savepoint undone as it
                // unwinds): the thread goes on serving.
                Ok(db) => std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(db, now)))
                    .unwrap_or_else(|_| Err(StoreError::Database("a store call panicked".into()))),
                Err(err) => Err(err.clone()),
            };
            Box::new(move |commit: Option<&StoreError>| {
                let _ = done.send(match commit {
                    Some(err) => Err(err.clone()),
                    None => result,
                });
            })
        };
        let call = Call { commits, run: Box::new(run) };
        self.db.send(call).map_err(|_| StoreError::Database("the store's thread is gone".into()))?;
        outcome.await.unwrap_or_else(|_| Err(StoreError::Database("the store's thread is gone".into())))
    }

    /// [`SqliteStore::with`] for a write whose loss in a power cut would be
    /// harmless: a claim, a renewal, progress. It is answered once
    /// committed, without waiting for a sync; the syncer's next sync (for a
    /// submit, a finish) takes it to disk too. A crash
    /// of the process loses nothing either way (the operating system holds
    /// the file), and a power cut that loses a claim or a renewal also
    /// stopped every front of this host, whose runs the lapsed leases give
    /// back.
    async fn unsynced<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Connection, i64) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.on(Commits::Unsynced, work).await
    }
}

fn record(row: &Row<'_>) -> rusqlite::Result<JobRecord> {
    let params: String = row.get(3)?;
    let state: i64 = row.get(7)?;
    let code: Option<i32> = row.get(9)?;
    Ok(JobRecord {
        job: NewJob {
            id: row.get(0)?,
            task: row.get(1)?,
            mode: row.get(2)?,
            params: serde_json::from_str(&params).unwrap_or_default(),
            input: Bytes::from(row.get::<_, Vec<u8>>(4)?),
            client: row.get(5)?,
            idempotency_key: row.get(6)?,
            traceparent: row.get(19)?,
            priority: match row.get::<_, bool>(20)? {
                true => Priority::Interactive,
                false => Priority::Batch,
            },
        },
        state: State::from_number(state).unwrap_or(State::Failed),
        output: row.get::<_, Option<Vec<u8>>>(8)?.map(Bytes::from),
        failure: match code {
            Some(code) => Some(JobFailure { code, message: row.get::<_, Option<String>>(10)?.unwrap_or_default() }),
            None => None,
        },
        progress: row.get(11)?,
        progress_message: row.get(12)?,
        attempts: row.get(13)?,
        cancel_requested: row.get(14)?,
        created_ms: row.get(15)?,
        started_ms: row.get(16)?,
        finished_ms: row.get(17)?,
    })
}

fn by_id(db: &Connection, id: &str) -> Result<Option<JobRecord>, StoreError> {
    Ok(db.prepare_cached(&format!("SELECT {COLUMNS} FROM jobs WHERE id = ?1"))?.query_row([id], record).optional()?)
}

#[async_trait::async_trait]
impl JobStore for SqliteStore {
    async fn submit(&self, jobs: Vec<Submission>) -> Result<Vec<Submitted>, StoreError> {
        self.with(move |db, now| {
            let tx = db.savepoint()?;
            let mut out = Vec::with_capacity(jobs.len());
            for Submission { job, start } in jobs {
                let (run_by, output) = (start.run_by(), start.output());
                if let Some(key) = &job.idempotency_key {
                    let existing = tx
                        .prepare_cached(&format!(
                            "SELECT {COLUMNS} FROM jobs WHERE client = ?1 AND idempotency_key = ?2"
                        ))?
                        .query_row(params![job.client, key], record)
                        .optional()?;
                    if let Some(existing) = existing {
                        out.push(Submitted::Existing(existing));
                        continue;
                    }
                }
                let params = serde_json::to_string(&job.params).map_err(|e| StoreError::Database(e.to_string()))?;
                // Read back as recorded, but for the input (the caller's own,
                // perhaps large).
                let mut recorded = tx
                    .prepare_cached(&format!(
                        "INSERT INTO jobs (id, task, mode, params, input, client, idempotency_key, state, created_ms,
                             traceparent, interactive, attempts, owner, lease_until, started_ms, output, finished_ms,
                             progress)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)
                         RETURNING {GET_COLUMNS}"
                    ))?
                    .query_row(
                        params![
                            job.id,
                            job.task,
                            job.mode,
                            params,
                            job.input.as_ref(),
                            job.client,
                            job.idempotency_key,
                            start.state().number(),
                            now,
                            job.traceparent,
                            job.priority == Priority::Interactive,
                            u32::from(run_by.is_some()),
                            run_by.map(|claimant| claimant.owner.as_str()),
                            run_by.map(|claimant| now + millis(claimant.lease)),
                            (!matches!(start, Start::Queued)).then_some(now),
                            output,
                            output.map(|_| now),
                            if output.is_some() { 1.0 } else { 0.0 },
                        ],
                        record,
                    )?;
                recorded.job.input = job.input;
                out.push(Submitted::New(recorded));
            }
            tx.commit()?;
            Ok(out)
        })
        .await
    }

    async fn get(&self, id: &str) -> Result<Option<JobRecord>, StoreError> {
        let id = id.to_string();
        self.read(move |db, _| {
            Ok(db
                .prepare_cached(&format!("SELECT {GET_COLUMNS} FROM jobs WHERE id = ?1"))?
                .query_row([id], record)
                .optional()?)
        })
        .await
    }

    async fn input(&self, id: &str) -> Result<Option<Bytes>, StoreError> {
        let id = id.to_string();
        self.read(move |db, _| {
            let input: Option<Vec<u8>> = db
                .prepare_cached("SELECT input FROM jobs WHERE id = ?1")?
                .query_row([id], |row| row.get(0))
                .optional()?;
            Ok(input.map(Bytes::from))
        })
        .await
    }

    async fn list(&self, filter: &Filter, limit: usize, after: Option<i64>) -> Result<Page, StoreError> {
        let filter = filter.clone();
        self.read(move |db, _| {
            let mut statement = db.prepare_cached(&format!(
                "SELECT {LIST_COLUMNS} FROM jobs WHERE (?1 IS NULL OR state = ?1) AND (?4 IS NULL OR client = ?4)
                     AND seq < ?2 ORDER BY seq DESC LIMIT ?3"
            ))?;
            let bounds =
                params![filter.state.map(State::number), after.unwrap_or(i64::MAX), limit as i64 + 1, filter.client];
            let rows = statement.query_map(bounds, |row| Ok((record(row)?, row.get::<_, i64>(18)?)))?;
            Ok(Page::of(rows.collect::<Result<_, _>>()?, limit))
        })
        .await
    }

    async fn claim(&self, owner: &str, lease: Duration, limit: usize) -> Result<Vec<JobRecord>, StoreError> {
        let owner = owner.to_string();
        self.unsynced(move |db, now| {
            let tx = db.savepoint()?;
            let mut claimed: Vec<(i64, JobRecord)> = tx
                .prepare_cached(&format!(
                    "UPDATE jobs SET state = ?1, attempts = attempts + 1, owner = ?2, lease_until = ?3, started_ms = ?4
                     WHERE seq IN (SELECT seq FROM jobs WHERE state = ?5 ORDER BY seq LIMIT ?6)
                     RETURNING {COLUMNS}"
                ))?
                .query_map(params![RUNNING, owner, now + millis(lease), now, QUEUED, limit as i64], |row| {
                    Ok((row.get(18)?, record(row)?))
                })?
                .collect::<Result<_, _>>()?;
            tx.commit()?;
            // RETURNING gives rows in no particular order.
            claimed.sort_by_key(|(seq, _)| *seq);
            Ok(claimed.into_iter().map(|(_, job)| job).collect())
        })
        .await
    }

    async fn renew(&self, id: &str, attempt: u32, lease: Duration) -> Result<bool, StoreError> {
        let id = id.to_string();
        self.unsynced(move |db, now| {
            let changed = db
                .prepare_cached("UPDATE jobs SET lease_until = ?1 WHERE id = ?2 AND attempts = ?3 AND state = ?4")?
                .execute(params![now + millis(lease), id, attempt, RUNNING])?;
            Ok(changed == 1)
        })
        .await
    }

    async fn progress(&self, id: &str, attempt: u32, fraction: f64, message: &str) -> Result<bool, StoreError> {
        let (id, message) = (id.to_string(), message.to_string());
        self.unsynced(move |db, _| {
            let changed = db
                .prepare_cached(
                    "UPDATE jobs SET progress = ?1, progress_message = ?2 WHERE id = ?3 AND attempts = ?4 AND state = ?5",
                )?
                .execute(params![fraction, message, id, attempt, RUNNING])?;
            Ok(changed == 1)
        })
        .await
    }

    async fn finish(&self, runs: Vec<Finished>) -> Result<Vec<Option<JobRecord>>, StoreError> {
        self.with(move |db, now| {
            let tx = db.savepoint()?;
            let mut written = Vec::with_capacity(runs.len());
            {
                let mut statement = tx.prepare_cached(&format!(
                    "UPDATE jobs SET state = ?1, output = ?2, error_code = ?3, error_message = ?4, finished_ms = ?5,
                         owner = NULL, lease_until = NULL, progress = CASE WHEN ?1 = 3 THEN 1.0 ELSE progress END
                     WHERE id = ?6 AND attempts = ?7 AND state = ?8
                     RETURNING {GET_COLUMNS}"
                ))?;
                for Finished { id, attempt, result } in &runs {
                    let (state, output, failure) = result.columns();
                    let values = params![
                        state.number(),
                        output,
                        failure.map(|f| f.code),
                        failure.map(|f| f.message.as_str()),
                        now,
                        id,
                        attempt,
                        RUNNING
                    ];
                    written.push(statement.query_row(values, record).optional()?);
                }
            }
            tx.commit()?;
            Ok(written)
        })
        .await
    }

    async fn release(&self, id: &str, attempt: u32) -> Result<bool, StoreError> {
        let id = id.to_string();
        self.with(move |db, now| {
            let changed = db
                .prepare_cached(
                    "UPDATE jobs SET state = CASE WHEN cancel_requested THEN ?5 ELSE ?1 END, attempts = attempts - 1,
                         error_code = CASE WHEN cancel_requested THEN ?6 END,
                         error_message = CASE WHEN cancel_requested THEN ?7 END,
                         finished_ms = CASE WHEN cancel_requested THEN ?8 END, owner = NULL, lease_until = NULL
                     WHERE id = ?2 AND attempts = ?3 AND state = ?4",
                )?
                .execute(params![
                    QUEUED,
                    id,
                    attempt,
                    RUNNING,
                    State::Cancelled.number(),
                    tonic::Code::Cancelled as i32,
                    CANCELLED_HANDED_BACK,
                    now
                ])?;
            Ok(changed == 1)
        })
        .await
    }

    async fn cancel(&self, id: &str) -> Result<Option<JobRecord>, StoreError> {
        let id = id.to_string();
        self.with(move |db, now| {
            let tx = db.savepoint()?;
            tx.prepare_cached(
                "UPDATE jobs SET state = ?1, error_code = ?2, error_message = ?3, finished_ms = ?4
                 WHERE id = ?5 AND state = ?6",
            )?
            .execute(params![
                State::Cancelled.number(),
                tonic::Code::Cancelled as i32,
                CANCELLED_QUEUED,
                now,
                id,
                QUEUED
            ])?;
            tx.prepare_cached("UPDATE jobs SET cancel_requested = 1 WHERE id = ?1 AND state = ?2")?
                .execute(params![id, RUNNING])?;
            let job = by_id(&tx, &id)?;
            tx.commit()?;
            Ok(job)
        })
        .await
    }

    async fn cancel_requests(&self, owner: &str) -> Result<Vec<(String, u32)>, StoreError> {
        let owner = owner.to_string();
        self.read(move |db, _| {
            let mut statement = db.prepare_cached(
                "SELECT id, attempts FROM jobs WHERE owner = ?1 AND state = ?2 AND cancel_requested = 1",
            )?;
            let rows = statement.query_map(params![owner, RUNNING], |row| Ok((row.get(0)?, row.get(1)?)))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    async fn expire_leases(&self, max_attempts: u32) -> Result<usize, StoreError> {
        self.with(move |db, now| {
            let tx = db.savepoint()?;
            let expired = "state = ?1 AND lease_until <= ?2";
            tx.prepare_cached(&format!(
                "UPDATE jobs SET state = ?3, error_code = ?4, error_message = ?5,
                         finished_ms = ?2, owner = NULL, lease_until = NULL
                     WHERE {expired} AND cancel_requested = 1"
            ))?
            .execute(params![
                RUNNING,
                now,
                State::Cancelled.number(),
                tonic::Code::Cancelled as i32,
                CANCELLED_LOST
            ])?;
            tx.prepare_cached(&format!(
                "UPDATE jobs SET state = ?3, error_code = ?4,
                         error_message = ?6 || attempts || ' of ' || ?5,
                         finished_ms = ?2, owner = NULL, lease_until = NULL
                     WHERE {expired} AND attempts >= ?5"
            ))?
            .execute(params![
                RUNNING,
                now,
                State::Failed.number(),
                tonic::Code::Unavailable as i32,
                max_attempts,
                LOST_ON_ATTEMPT
            ])?;
            let queued = tx
                .prepare_cached(&format!(
                    "UPDATE jobs SET state = ?3, owner = NULL, lease_until = NULL WHERE {expired}"
                ))?
                .execute(params![RUNNING, now, QUEUED])?;
            tx.commit()?;
            Ok(queued)
        })
        .await
    }

    async fn queued_of(&self, client: &str) -> Result<usize, StoreError> {
        let client = client.to_string();
        self.read(move |db, _| {
            let count: i64 = db
                .prepare_cached("SELECT COUNT(*) FROM jobs WHERE client = ?1 AND state = ?2")?
                .query_row(params![client, QUEUED], |row| row.get(0))?;
            Ok(count as usize)
        })
        .await
    }

    async fn stats(&self) -> Result<Stats, StoreError> {
        self.read(move |db, now| {
            let mut statement = db.prepare_cached("SELECT state, COUNT(*) FROM jobs GROUP BY state ORDER BY state")?;
            let rows = statement.query_map([], |row| Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)?)))?;
            let counts = rows.collect::<Result<Vec<_>, _>>()?;
            let oldest: Option<i64> = db
                .prepare_cached("SELECT MIN(created_ms) FROM jobs WHERE state = ?1")?
                .query_row([QUEUED], |row| row.get(0))?;
            Ok(Stats::of(counts, oldest.map(|created| now - created)))
        })
        .await
    }

    async fn delete_finished(&self, retention: Duration) -> Result<usize, StoreError> {
        self.with(move |db, now| {
            Ok(db
                .prepare_cached("DELETE FROM jobs WHERE finished_ms IS NOT NULL AND finished_ms <= ?1")?
                .execute([now - millis(retention)])?)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::conformance;

    fn store() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("jobs.sqlite3")).unwrap();
        (dir, store)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn keeps_the_job_store_contract() {
        let (_dir, store) = store();
        conformance::check_all(&store).await;
    }

    #[tokio::test]
    async fn a_file_made_before_a_column_was_added_gets_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.sqlite3");
        let old = SCHEMA
            .replace("    traceparent TEXT NOT NULL DEFAULT '',\n", "")
            .replace("    interactive INTEGER NOT NULL DEFAULT 0,\n", "");
        assert_ne!(old, SCHEMA);
        Connection::open(&path).unwrap().execute_batch(&old).unwrap();
        let store = SqliteStore::open(&path).unwrap();
        store.submit(vec![conformance::job("a", None).into()]).await.unwrap();
        assert_eq!(store.get("a").await.unwrap().unwrap().job.traceparent, conformance::job("a", None).traceparent);
    }

    #[tokio::test]
    async fn jobs_survive_reopening() {
        let (dir, store) = store();
        store.submit(vec![conformance::job("a", None).into()]).await.unwrap();
        drop(store);
        let reopened = SqliteStore::open(&dir.path().join("jobs.sqlite3")).unwrap();
        let claimed = reopened.claim("f", Duration::from_secs(60), 1).await.unwrap();
        assert_eq!(claimed[0].job.input.as_ref(), b"abc");
    }
}
