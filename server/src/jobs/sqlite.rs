//! The embedded job store: one SQLite file on local disk, needing no set-up.
//! SQLite because it is transactional, survives a crash of the process at
//! any point (its write-ahead log with `synchronous = FULL` syncs each
//! commit to disk before the commit returns, so an acknowledged Submit and
//! a recorded result also survive a power loss of the host), can be opened
//! by several processes of one host (replicas) at once, and can be
//! inspected with the `sqlite3` shell. It is bundled (compiled in), so
//! nothing needs installing. Claims, renewals and progress are not synced
//! on their own (see `SqliteStore::unsynced`).

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use rusqlite::{Connection, OptionalExtension, Row, params};

use crate::schedule::Priority;

use super::store::{
    CANCELLED_HANDED_BACK, CANCELLED_LOST, CANCELLED_QUEUED, Filter, Finished, JobFailure, JobRecord, JobStore,
    LOST_ON_ATTEMPT, NewJob, Page, State, Stats, StoreError, Submitted, millis, now_ms, record_columns,
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
    db: Arc<Mutex<Connections>>,
}

/// Two connections to the file, used one at a time (so they never wait for
/// each other's locks): one whose commits are synced to disk, one whose
/// commits are not (see `SqliteStore::unsynced`). The setting is per
/// connection, and changing it per transaction cost more than the rest.
#[derive(Debug)]
struct Connections {
    synced: Connection,
    unsynced: Connection,
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
        let connect = |synchronous: &str| -> Result<Connection, StoreError> {
            let db = Connection::open(path)?;
            // Several processes (replicas) may share the file: writers wait
            // for each other rather than fail.
            db.busy_timeout(Duration::from_secs(10))?;
            // Every statement the store runs stays prepared (parsing them
            // each time cost more than running them).
            db.set_prepared_statement_cache_capacity(64);
            db.pragma_update(None, "journal_mode", "WAL")?;
            db.pragma_update(None, "synchronous", synchronous)?;
            Ok(db)
        };
        let db = connect("FULL")?;
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
        let unsynced = connect("NORMAL")?;
        Ok(Self { path: path.to_owned(), db: Arc::new(Mutex::new(Connections { synced: db, unsynced })) })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `work` on the synced connection off the async runtime: every
    /// call blocks on the disk (a commit waits for its fsync).
    async fn with<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Connection, i64) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.on(|db| &mut db.synced, work).await
    }

    /// Runs `work` on the connection `pick` picks, off the async runtime.
    async fn on<T: Send + 'static>(
        &self,
        pick: fn(&mut Connections) -> &mut Connection,
        work: impl FnOnce(&mut Connection, i64) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = Arc::clone(&self.db);
        tokio::task::spawn_blocking(move || work(pick(&mut db.lock().unwrap_or_else(|e| e.into_inner())), now_ms()))
            .await
            .unwrap_or_else(|e| Err(StoreError::Database(format!("a store call panicked: {e}"))))
    }

    /// [`SqliteStore::with`] for a write whose loss in a power cut would be
    /// harmless: a claim, a renewal, progress. Its commit is not synced (a
    /// connection with `synchronous = NORMAL`); the next synced commit (a
    /// submit, a finish) syncs the shared log, this commit with it. A crash
    /// of the process loses nothing either way (the operating system holds
    /// the file), and a power cut that loses a claim or a renewal also
    /// stopped every front of this host, whose runs the lapsed leases give
    /// back.
    async fn unsynced<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Connection, i64) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.on(|db| &mut db.unsynced, work).await
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
    async fn submit(&self, jobs: Vec<NewJob>) -> Result<Vec<Submitted>, StoreError> {
        self.with(move |db, now| {
            let tx = db.transaction()?;
            let mut out = Vec::with_capacity(jobs.len());
            for job in jobs {
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
                             traceparent, interactive)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
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
                            QUEUED,
                            now,
                            job.traceparent,
                            job.priority == Priority::Interactive
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
        self.with(move |db, _| {
            Ok(db
                .prepare_cached(&format!("SELECT {GET_COLUMNS} FROM jobs WHERE id = ?1"))?
                .query_row([id], record)
                .optional()?)
        })
        .await
    }

    async fn list(&self, filter: &Filter, limit: usize, after: Option<i64>) -> Result<Page, StoreError> {
        let filter = filter.clone();
        self.with(move |db, _| {
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
            let tx = db.transaction()?;
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

    async fn finish(&self, runs: Vec<Finished>) -> Result<Vec<bool>, StoreError> {
        self.with(move |db, now| {
            let tx = db.transaction()?;
            let mut written = Vec::with_capacity(runs.len());
            {
                let mut statement = tx.prepare_cached(
                    "UPDATE jobs SET state = ?1, output = ?2, error_code = ?3, error_message = ?4, finished_ms = ?5,
                         owner = NULL, lease_until = NULL, progress = CASE WHEN ?1 = 3 THEN 1.0 ELSE progress END
                     WHERE id = ?6 AND attempts = ?7 AND state = ?8",
                )?;
                for Finished { id, attempt, result } in &runs {
                    let (state, output, failure) = result.columns();
                    let changed = statement.execute(params![
                        state.number(),
                        output,
                        failure.map(|f| f.code),
                        failure.map(|f| f.message.as_str()),
                        now,
                        id,
                        attempt,
                        RUNNING
                    ])?;
                    written.push(changed == 1);
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
            let tx = db.transaction()?;
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
        self.with(move |db, _| {
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
            let tx = db.transaction()?;
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
        self.with(move |db, _| {
            let count: i64 = db
                .prepare_cached("SELECT COUNT(*) FROM jobs WHERE client = ?1 AND state = ?2")?
                .query_row(params![client, QUEUED], |row| row.get(0))?;
            Ok(count as usize)
        })
        .await
    }

    async fn stats(&self) -> Result<Stats, StoreError> {
        self.with(move |db, now| {
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
        store.submit(vec![conformance::job("a", None)]).await.unwrap();
        assert_eq!(store.get("a").await.unwrap().unwrap().job.traceparent, conformance::job("a", None).traceparent);
    }

    #[tokio::test]
    async fn jobs_survive_reopening() {
        let (dir, store) = store();
        store.submit(vec![conformance::job("a", None)]).await.unwrap();
        drop(store);
        let reopened = SqliteStore::open(&dir.path().join("jobs.sqlite3")).unwrap();
        let claimed = reopened.claim("f", Duration::from_secs(60), 1).await.unwrap();
        assert_eq!(claimed[0].job.input.as_ref(), b"abc");
    }
}
