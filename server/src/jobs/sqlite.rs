//! The embedded job store: one SQLite file on local disk, needing no set-up.
//! SQLite because it is transactional, survives a crash of the process at
//! any point (its write-ahead log with `synchronous = FULL` syncs each
//! commit to disk before the commit returns, so an acknowledged Submit also
//! survives a power loss of the host), can be opened by several processes
//! of one host (replicas) at once, and can be inspected with the `sqlite3`
//! shell. It is bundled (compiled in), so nothing needs installing.

use std::{
    path::{Path, PathBuf},
    sync::Mutex,
    time::Duration,
};

use bytes::Bytes;
use rusqlite::{Connection, OptionalExtension, Row, params};

use crate::schedule::Priority;

use super::store::{
    Filter, JobFailure, JobRecord, JobStore, NewJob, Page, RunResult, State, Stats, StoreError, Submitted,
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
    db: Mutex<Connection>,
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
const COLUMNS: &str = "id, task, mode, params, input, client, idempotency_key, state, output, error_code, \
                       error_message, progress, progress_message, attempts, cancel_requested, created_ms, \
                       started_ms, finished_ms, seq, traceparent, interactive";
/// The same, inputs and outputs left out (for listing).
const LIST_COLUMNS: &str = "id, task, mode, params, X'', client, idempotency_key, state, NULL, error_code, \
                            error_message, progress, progress_message, attempts, cancel_requested, created_ms, \
                            started_ms, finished_ms, seq, traceparent, interactive";

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
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "FULL")?;
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
        Ok(Self { path: path.to_owned(), db: Mutex::new(db) })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|e| e.into_inner())
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
    Ok(db.query_row(&format!("SELECT {COLUMNS} FROM jobs WHERE id = ?1"), [id], record).optional()?)
}

impl JobStore for SqliteStore {
    fn submit(&self, jobs: &[NewJob], now_ms: i64) -> Result<Vec<Submitted>, StoreError> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let mut out = Vec::with_capacity(jobs.len());
        for job in jobs {
            if let Some(key) = &job.idempotency_key {
                let existing = tx
                    .query_row(
                        &format!("SELECT {COLUMNS} FROM jobs WHERE client = ?1 AND idempotency_key = ?2"),
                        params![job.client, key],
                        record,
                    )
                    .optional()?;
                if let Some(existing) = existing {
                    out.push(Submitted::Existing(existing));
                    continue;
                }
            }
            let params = serde_json::to_string(&job.params).map_err(|e| StoreError::Database(e.to_string()))?;
            tx.execute(
                "INSERT INTO jobs (id, task, mode, params, input, client, idempotency_key, state, created_ms, traceparent,
                     interactive)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                params![
                    job.id,
                    job.task,
                    job.mode,
                    params,
                    job.input.as_ref(),
                    job.client,
                    job.idempotency_key,
                    QUEUED,
                    now_ms,
                    job.traceparent,
                    job.priority == Priority::Interactive
                ],
            )?;
            let recorded =
                by_id(&tx, &job.id)?.ok_or_else(|| StoreError::Database("a job just recorded is gone".into()))?;
            out.push(Submitted::New(recorded));
        }
        tx.commit()?;
        Ok(out)
    }

    fn get(&self, id: &str) -> Result<Option<JobRecord>, StoreError> {
        by_id(&self.db(), id)
    }

    fn list(&self, filter: &Filter, limit: usize, after: Option<i64>) -> Result<Page, StoreError> {
        let db = self.db();
        let mut statement = db.prepare(&format!(
            "SELECT {LIST_COLUMNS} FROM jobs WHERE (?1 IS NULL OR state = ?1) AND (?4 IS NULL OR client = ?4)
                 AND seq < ?2 ORDER BY seq DESC LIMIT ?3"
        ))?;
        let bounds =
            params![filter.state.map(State::number), after.unwrap_or(i64::MAX), limit as i64 + 1, filter.client];
        let rows = statement.query_map(bounds, |row| Ok((record(row)?, row.get::<_, i64>(18)?)))?;
        let mut jobs: Vec<(JobRecord, i64)> = rows.collect::<Result<_, _>>()?;
        let next = (jobs.len() > limit).then(|| jobs[limit - 1].1);
        jobs.truncate(limit);
        Ok(Page { jobs: jobs.into_iter().map(|(job, _)| job).collect(), next })
    }

    fn claim(&self, owner: &str, now_ms: i64, lease_until_ms: i64) -> Result<Option<JobRecord>, StoreError> {
        let db = self.db();
        let claimed: Option<String> = db
            .query_row(
                "UPDATE jobs SET state = ?1, attempts = attempts + 1, owner = ?2, lease_until = ?3, started_ms = ?4
                 WHERE seq = (SELECT seq FROM jobs WHERE state = ?5 ORDER BY seq LIMIT 1)
                 RETURNING id",
                params![RUNNING, owner, lease_until_ms, now_ms, QUEUED],
                |row| row.get(0),
            )
            .optional()?;
        match claimed {
            Some(id) => by_id(&db, &id),
            None => Ok(None),
        }
    }

    fn renew(&self, id: &str, attempt: u32, lease_until_ms: i64) -> Result<bool, StoreError> {
        let changed = self.db().execute(
            "UPDATE jobs SET lease_until = ?1 WHERE id = ?2 AND attempts = ?3 AND state = ?4",
            params![lease_until_ms, id, attempt, RUNNING],
        )?;
        Ok(changed == 1)
    }

    fn progress(&self, id: &str, attempt: u32, fraction: f64, message: &str) -> Result<bool, StoreError> {
        let changed = self.db().execute(
            "UPDATE jobs SET progress = ?1, progress_message = ?2 WHERE id = ?3 AND attempts = ?4 AND state = ?5",
            params![fraction, message, id, attempt, RUNNING],
        )?;
        Ok(changed == 1)
    }

    fn finish(&self, id: &str, attempt: u32, result: &RunResult, now_ms: i64) -> Result<bool, StoreError> {
        let (state, output, failure) = match result {
            RunResult::Succeeded(output) => (State::Succeeded, Some(output.as_ref()), None),
            RunResult::Ended(state, failure) => (*state, None, Some(failure)),
        };
        let changed = self.db().execute(
            "UPDATE jobs SET state = ?1, output = ?2, error_code = ?3, error_message = ?4, finished_ms = ?5,
                 owner = NULL, lease_until = NULL, progress = CASE WHEN ?1 = 3 THEN 1.0 ELSE progress END
             WHERE id = ?6 AND attempts = ?7 AND state = ?8",
            params![
                state.number(),
                output,
                failure.map(|f| f.code),
                failure.map(|f| f.message.as_str()),
                now_ms,
                id,
                attempt,
                RUNNING
            ],
        )?;
        Ok(changed == 1)
    }

    fn release(&self, id: &str, attempt: u32) -> Result<bool, StoreError> {
        let changed = self.db().execute(
            "UPDATE jobs SET state = ?1, attempts = attempts - 1, owner = NULL, lease_until = NULL
             WHERE id = ?2 AND attempts = ?3 AND state = ?4",
            params![QUEUED, id, attempt, RUNNING],
        )?;
        Ok(changed == 1)
    }

    fn cancel(&self, id: &str, now_ms: i64) -> Result<Option<JobRecord>, StoreError> {
        let mut db = self.db();
        let tx = db.transaction()?;
        tx.execute(
            "UPDATE jobs SET state = ?1, error_code = ?2, error_message = 'cancelled before it ran', finished_ms = ?3
             WHERE id = ?4 AND state = ?5",
            params![State::Cancelled.number(), tonic::Code::Cancelled as i32, now_ms, id, QUEUED],
        )?;
        tx.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?1 AND state = ?2", params![id, RUNNING])?;
        let job = by_id(&tx, id)?;
        tx.commit()?;
        Ok(job)
    }

    fn cancel_requests(&self, owner: &str) -> Result<Vec<(String, u32)>, StoreError> {
        let db = self.db();
        let mut statement =
            db.prepare("SELECT id, attempts FROM jobs WHERE owner = ?1 AND state = ?2 AND cancel_requested = 1")?;
        let rows = statement.query_map(params![owner, RUNNING], |row| Ok((row.get(0)?, row.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn expire_leases(&self, now_ms: i64, max_attempts: u32) -> Result<usize, StoreError> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let expired = "state = ?1 AND lease_until < ?2";
        tx.execute(
            &format!(
                "UPDATE jobs SET state = ?3, error_code = ?4, error_message = 'cancelled while its front was lost',
                     finished_ms = ?2, owner = NULL, lease_until = NULL
                 WHERE {expired} AND cancel_requested = 1"
            ),
            params![RUNNING, now_ms, State::Cancelled.number(), tonic::Code::Cancelled as i32],
        )?;
        tx.execute(
            &format!(
                "UPDATE jobs SET state = ?3, error_code = ?4,
                     error_message = 'its front stopped renewing its lease on attempt ' || attempts || ' of ' || ?5,
                     finished_ms = ?2, owner = NULL, lease_until = NULL
                 WHERE {expired} AND attempts >= ?5"
            ),
            params![RUNNING, now_ms, State::Failed.number(), tonic::Code::Unavailable as i32, max_attempts],
        )?;
        let queued = tx.execute(
            &format!("UPDATE jobs SET state = ?3, owner = NULL, lease_until = NULL WHERE {expired}"),
            params![RUNNING, now_ms, QUEUED],
        )?;
        tx.commit()?;
        Ok(queued)
    }

    fn queued_of(&self, client: &str) -> Result<usize, StoreError> {
        let count: i64 = self.db().query_row(
            "SELECT COUNT(*) FROM jobs WHERE client = ?1 AND state = ?2",
            params![client, QUEUED],
            |row| row.get(0),
        )?;
        Ok(count as usize)
    }

    fn stats(&self) -> Result<Stats, StoreError> {
        let db = self.db();
        let mut statement = db.prepare("SELECT state, COUNT(*) FROM jobs GROUP BY state")?;
        let rows = statement.query_map([], |row| Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)?)))?;
        let mut by_state = Vec::new();
        for row in rows {
            let (state, count) = row?;
            by_state.extend(State::from_number(state).map(|state| (state, count as u64)));
        }
        let oldest_queued_ms =
            db.query_row("SELECT MIN(created_ms) FROM jobs WHERE state = ?1", [QUEUED], |row| row.get(0))?;
        Ok(Stats { by_state, oldest_queued_ms })
    }

    fn delete_finished(&self, before_ms: i64) -> Result<usize, StoreError> {
        Ok(self.db().execute("DELETE FROM jobs WHERE finished_ms IS NOT NULL AND finished_ms < ?1", [before_ms])?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::store::{lease_until, now_ms};

    fn job(id: &str, key: Option<&str>) -> NewJob {
        NewJob {
            id: id.into(),
            task: "hash.sha256".into(),
            mode: 0,
            params: [("a".to_string(), "1".to_string())].into(),
            input: Bytes::from_static(b"abc"),
            client: String::new(),
            idempotency_key: key.map(String::from),
            traceparent: String::new(),
            priority: Priority::Batch,
        }
    }

    fn store() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("jobs.sqlite3")).unwrap();
        (dir, store)
    }

    #[test]
    fn a_job_is_claimed_once_run_fenced_and_finished() {
        let (_dir, store) = store();
        let now = now_ms();
        let submitted = store.submit(&[job("a", None), job("b", Some("k"))], now).unwrap();
        assert!(matches!(&submitted[0], Submitted::New(r) if r.state == State::Queued && r.attempts == 0));
        let again = store.submit(&[job("c", Some("k"))], now).unwrap();
        assert!(matches!(&again[0], Submitted::Existing(r) if r.job.id == "b"), "the key's job");

        let claimed = store.claim("front-1", now, now + 1000).unwrap().expect("the oldest");
        assert_eq!((claimed.job.id.as_str(), claimed.state, claimed.attempts), ("a", State::Running, 1));
        assert!(store.renew("a", 1, now + 2000).unwrap());
        assert!(store.progress("a", 1, 0.5, "half").unwrap());
        // Its lease runs out: the job is queued again, and the old run's
        // writes are refused once another run has it.
        assert_eq!(store.expire_leases(now + 3000, 3).unwrap(), 1);
        let retaken = store.claim("front-2", now + 3000, now + 4000).unwrap().unwrap();
        assert_eq!((retaken.job.id.as_str(), retaken.attempts), ("a", 2));
        let output = RunResult::Succeeded(Bytes::from_static(b"out"));
        assert!(!store.finish("a", 1, &output, now).unwrap(), "the stale run changes nothing");
        assert!(!store.renew("a", 1, now + 9000).unwrap());
        assert!(store.finish("a", 2, &output, now).unwrap());
        let done = store.get("a").unwrap().unwrap();
        assert_eq!((done.state, done.output.as_deref(), done.progress), (State::Succeeded, Some(&b"out"[..]), 1.0));
    }

    #[test]
    fn attempts_run_out_cancels_and_hand_backs() {
        let (_dir, store) = store();
        let now = now_ms();
        store.submit(&[job("a", None), job("b", None), job("c", None)], now).unwrap();
        // "a" loses its front three times: then it fails, naming why.
        for attempt in 1..=3 {
            let claimed = store.claim("f", now, now).unwrap().unwrap();
            assert_eq!((claimed.job.id.as_str(), claimed.attempts), ("a", attempt));
            store.expire_leases(now + 1, 3).unwrap();
        }
        let failed = store.get("a").unwrap().unwrap();
        assert_eq!(failed.state, State::Failed);
        assert!(failed.failure.unwrap().message.contains("attempt 3 of 3"));
        // A queued job is cancelled at once; a running one is flagged.
        let b = store.claim("f", now, lease_until(now, Duration::from_secs(30))).unwrap().unwrap();
        assert_eq!(store.cancel("c", now).unwrap().unwrap().state, State::Cancelled);
        assert!(store.cancel("b", now).unwrap().unwrap().cancel_requested);
        assert_eq!(store.cancel_requests("f").unwrap(), vec![("b".to_string(), b.attempts)]);
        // Handed back by a draining front: queued, the attempt not counted.
        assert!(store.release("b", b.attempts).unwrap());
        let back = store.get("b").unwrap().unwrap();
        assert_eq!((back.state, back.attempts), (State::Queued, 0));
        // Listing, newest first, in pages.
        let all = Filter::default();
        let first = store.list(&all, 2, None).unwrap();
        assert_eq!(first.jobs.iter().map(|j| j.job.id.as_str()).collect::<Vec<_>>(), ["c", "b"]);
        let rest = store.list(&all, 2, first.next).unwrap();
        assert_eq!((rest.jobs.len(), rest.next), (1, None));
        assert!(rest.jobs[0].job.input.is_empty(), "inputs are left out");
        let cancelled = Filter { state: Some(State::Cancelled), ..Filter::default() };
        assert_eq!(store.list(&cancelled, 10, None).unwrap().jobs.len(), 1);
        let theirs = Filter { client: Some("billing".into()), ..Filter::default() };
        assert!(store.list(&theirs, 10, None).unwrap().jobs.is_empty(), "another client's");
        let stats = store.stats().unwrap();
        assert_eq!(stats.by_state, [(State::Queued, 1), (State::Failed, 1), (State::Cancelled, 1)]);
        assert_eq!(stats.oldest_queued_ms, Some(now));
        assert_eq!(store.delete_finished(now + 10).unwrap(), 2, "a and c");
    }

    #[test]
    fn a_file_made_before_a_column_was_added_gets_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.sqlite3");
        let old = SCHEMA
            .replace("    traceparent TEXT NOT NULL DEFAULT '',\n", "")
            .replace("    interactive INTEGER NOT NULL DEFAULT 0,\n", "");
        assert_ne!(old, SCHEMA);
        Connection::open(&path).unwrap().execute_batch(&old).unwrap();
        let store = SqliteStore::open(&path).unwrap();
        store.submit(&[job("a", None)], now_ms()).unwrap();
        assert_eq!(store.get("a").unwrap().unwrap().job.traceparent, "");
    }

    #[test]
    fn jobs_survive_reopening() {
        let (dir, store) = store();
        store.submit(&[job("a", None)], now_ms()).unwrap();
        drop(store);
        let reopened = SqliteStore::open(&dir.path().join("jobs.sqlite3")).unwrap();
        assert_eq!(reopened.get("a").unwrap().unwrap().job.input.as_ref(), b"abc");
    }
}
