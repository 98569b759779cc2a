//! The shared store: a PostgreSQL database that any number of fronts on any
//! number of hosts use at once. This is how jobs outgrow one host: the
//! database teams already run, back up and inspect (`SELECT * FROM
//! offload_jobs`), and no consensus of Offload's own.
//!
//! - Claiming takes the oldest queued row with `FOR UPDATE SKIP LOCKED`:
//!   fronts claiming at once each get a different job, and none waits for
//!   another's transaction.
//! - Every write that changes a job also sends `NOTIFY offload_jobs` in its
//!   transaction; each front LISTENs on a connection of its own, so a wait on
//!   one front hears of progress made on another at once, and an idle front
//!   hears of a job queued elsewhere (polls remain, for notices lost while a
//!   connection was down).
//! - Times (leases, ages, retention) are the database server's clock, so
//!   fronts on hosts whose clocks disagree still agree on when a lease lapsed.
//! - A commit is durable as PostgreSQL's settings make it: with `fsync` and
//!   `synchronous_commit` on (its defaults), an acknowledged Submit survives
//!   a power loss of the database host.

use std::{collections::HashMap, sync::Mutex, time::Duration};

use bytes::Bytes;
use deadpool_postgres::GenericClient;
use futures::StreamExt as _;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, NoTls, Row, types::Type};

use super::store::{
    CANCELLED_HANDED_BACK, CANCELLED_LOST, CANCELLED_QUEUED, Filter, Finished, JobFailure, JobRecord, JobStore,
    LOST_ON_ATTEMPT, NewJob, Notice, NoticeKind as Kind, Page, Start, State, Stats, StoreError, Submission, Submitted,
    millis, record_columns,
};
use crate::{
    pg::{CALL_TIMEOUT, Database, NOW_MS, PgError},
    schedule::Priority,
};

impl From<PgError> for StoreError {
    fn from(err: PgError) -> Self {
        StoreError::Database(err.to_string())
    }
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(err: tokio_postgres::Error) -> Self {
        PgError::from(err).into()
    }
}

/// The channel of LISTEN/NOTIFY.
const CHANNEL: &str = "offload_jobs";
/// Notices held for the front before the oldest are dropped (a poll then
/// finds what they said).
const NOTICE_BUFFER: usize = 1024;

/// The table and its indexes. Only live jobs are indexed by state: queued
/// ones oldest first (for claims), running ones by lease (for expiry);
/// finished rows, nearly all of the table, stay out of both, so neither
/// grows with the retention. The indexes of earlier versions (every row by
/// state; running rows by owner) are dropped.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS offload_jobs (
    seq BIGSERIAL PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    task TEXT NOT NULL,
    mode INTEGER NOT NULL,
    params TEXT NOT NULL,
    input BYTEA NOT NULL,
    client TEXT NOT NULL,
    idempotency_key TEXT,
    state INTEGER NOT NULL,
    output BYTEA,
    error_code INTEGER,
    error_message TEXT,
    progress DOUBLE PRECISION NOT NULL DEFAULT 0,
    progress_message TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0,
    owner TEXT,
    lease_until BIGINT,
    cancel_requested BOOLEAN NOT NULL DEFAULT FALSE,
    created_ms BIGINT NOT NULL,
    started_ms BIGINT,
    finished_ms BIGINT,
    traceparent TEXT NOT NULL DEFAULT '',
    interactive BOOLEAN NOT NULL DEFAULT FALSE,
    UNIQUE (client, idempotency_key)
);
CREATE INDEX IF NOT EXISTS offload_jobs_queued ON offload_jobs (seq) WHERE state = 1;
CREATE INDEX IF NOT EXISTS offload_jobs_running ON offload_jobs (lease_until) WHERE state = 2;
DROP INDEX IF EXISTS offload_jobs_by_state;
DROP INDEX IF EXISTS offload_jobs_by_owner;
CREATE INDEX IF NOT EXISTS offload_jobs_finished ON offload_jobs (finished_ms) WHERE finished_ms IS NOT NULL;
";

/// Every column of a record, in [`record`]'s order.
const COLUMNS: &str = record_columns!("input", "output");
/// The same, the input left out (for looking a job up).
const GET_COLUMNS: &str = record_columns!("''::bytea", "output");
/// The same, inputs and outputs left out (for listing).
const LIST_COLUMNS: &str = record_columns!("''::bytea", "NULL::bytea");

const QUEUED: i32 = 1;
const RUNNING: i32 = 2;
const SUCCEEDED: i32 = 3;

/// Jobs in a PostgreSQL database.
#[derive(Debug)]
pub struct PgStore {
    db: Database,
    /// Tags this front's notices, so that it skips its own.
    origin: String,
    notices: Mutex<Option<mpsc::Receiver<Notice>>>,
    listener: tokio::task::JoinHandle<()>,
}

impl Drop for PgStore {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

impl PgStore {
    /// Connects to the database `url` names, making its table if need be,
    /// and starts listening for other fronts' notices.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        // The lock is an arbitrary constant of Offload's jobs.
        let db = Database::connect(url, "job", SCHEMA, 7301554207614285647).await?;
        let origin = getrandom::u64().map_err(|e| StoreError::Database(format!("no randomness: {e}")))?;
        let origin = format!("{origin:016x}");
        let (tx, rx) = mpsc::channel(NOTICE_BUFFER);
        let (listening, listened) = tokio::sync::oneshot::channel();
        let listener = tokio::spawn(listen(db.config().clone(), origin.clone(), tx, listening));
        // Returned once it listens, so that no change made after this is
        // missed; a LISTEN that fails now is retried in the background.
        let _ = tokio::time::timeout(CALL_TIMEOUT, listened).await;
        Ok(Self { db, origin, notices: Mutex::new(Some(rx)), listener })
    }

    /// The database, for the log: host, port and name, never the password.
    pub fn describe(&self) -> &str {
        self.db.describe()
    }

    /// Runs `work` with a pooled connection, bounded by [`CALL_TIMEOUT`].
    async fn with<T>(
        &self,
        work: impl AsyncFnOnce(&mut deadpool_postgres::Object) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.db.with(work).await
    }

    /// `pg_notify(...)` telling other fronts what changed of the row's job.
    fn notify(&self, kind: Kind) -> String {
        let tag = match kind {
            Kind::Queued => 'q',
            Kind::CancelAsked => 'x',
            Kind::Changed | Kind::Missed => 'c',
        };
        format!("pg_notify('{CHANNEL}', '{}:{tag}:' || id)", self.origin)
    }
}

/// Listens for other fronts' notices, reconnecting after a lost connection,
/// until the front stops taking them.
async fn listen(
    config: tokio_postgres::Config,
    origin: String,
    notices: mpsc::Sender<Notice>,
    listening: tokio::sync::oneshot::Sender<()>,
) {
    let mut listening = Some(listening);
    let mut lost = false;
    while !notices.is_closed() {
        match config.connect(NoTls).await {
            Ok((client, connection)) => {
                // The connection is driven (and its notices passed on) while
                // LISTEN is sent, and until it ends.
                let mut forwarding = std::pin::pin!(forward(connection, &origin, &notices));
                let command = format!("LISTEN {CHANNEL}");
                tokio::select! {
                    listened = client.batch_execute(&command) => match listened {
                        Ok(()) => {
                            if let Some(listening) = listening.take() {
                                let _ = listening.send(());
                            }
                            if std::mem::take(&mut lost) {
                                tracing::info!("listening for job changes again");
                                // What changed while no one listened is
                                // looked up again.
                                let _ = notices.try_send(Notice { id: String::new(), kind: Kind::Missed });
                            }
                            forwarding.await;
                        }
                        Err(err) => tracing::warn!(error = %err, "cannot LISTEN for job changes; retrying"),
                    },
                    () = &mut forwarding => {}
                }
            }
            Err(err) if !lost => tracing::warn!(error = %err, "cannot connect to listen for job changes; retrying"),
            Err(_) => {}
        }
        lost = true;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Drives `connection`, passing other fronts' notices on, until it ends or
/// the front stops taking them.
async fn forward<S, T>(mut connection: tokio_postgres::Connection<S, T>, origin: &str, notices: &mpsc::Sender<Notice>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
    while let Some(message) = messages.next().await {
        match message {
            Ok(AsyncMessage::Notification(note)) => {
                if let Some(notice) = parse(note.payload(), origin) {
                    // Full: the front is behind, and its polls will find it.
                    let _ = notices.try_send(notice);
                }
            }
            Ok(_) => {}
            Err(err) => {
                tracing::warn!(error = %err, "lost the connection listening for job changes");
                return;
            }
        }
        if notices.is_closed() {
            return;
        }
    }
}

/// The notice `payload` ("origin:kind:id") gives, unless this front sent it.
fn parse(payload: &str, origin: &str) -> Option<Notice> {
    let mut parts = payload.splitn(3, ':');
    let (from, kind, id) = (parts.next()?, parts.next()?, parts.next()?);
    let kind = match kind {
        "q" => Kind::Queued,
        "x" => Kind::CancelAsked,
        _ => Kind::Changed,
    };
    (from != origin).then(|| Notice { id: id.to_string(), kind })
}

fn record(row: &Row) -> Result<JobRecord, StoreError> {
    let get = |e: tokio_postgres::Error| StoreError::from(e);
    let params: String = row.try_get(3).map_err(get)?;
    let code: Option<i32> = row.try_get(9).map_err(get)?;
    let attempts: i32 = row.try_get(13).map_err(get)?;
    Ok(JobRecord {
        job: NewJob {
            id: row.try_get(0).map_err(get)?,
            task: row.try_get(1).map_err(get)?,
            mode: row.try_get(2).map_err(get)?,
            params: serde_json::from_str(&params).unwrap_or_default(),
            input: Bytes::from(row.try_get::<_, Vec<u8>>(4).map_err(get)?),
            client: row.try_get(5).map_err(get)?,
            idempotency_key: row.try_get(6).map_err(get)?,
            traceparent: row.try_get(19).map_err(get)?,
            priority: match row.try_get::<_, bool>(20).map_err(get)? {
                true => Priority::Interactive,
                false => Priority::Batch,
            },
        },
        state: State::from_number(row.try_get::<_, i32>(7).map_err(get)?.into()).unwrap_or(State::Failed),
        output: row.try_get::<_, Option<Vec<u8>>>(8).map_err(get)?.map(Bytes::from),
        failure: match code {
            Some(code) => Some(JobFailure {
                code,
                message: row.try_get::<_, Option<String>>(10).map_err(get)?.unwrap_or_default(),
            }),
            None => None,
        },
        progress: row.try_get(11).map_err(get)?,
        progress_message: row.try_get(12).map_err(get)?,
        attempts: attempts.max(0) as u32,
        cancel_requested: row.try_get(14).map_err(get)?,
        created_ms: row.try_get(15).map_err(get)?,
        started_ms: row.try_get(16).map_err(get)?,
        finished_ms: row.try_get(17).map_err(get)?,
    })
}

/// Rows returned by a statement over a group, by the id of each: the
/// group's writes that took effect.
fn by_id(rows: &[Row]) -> Result<HashMap<String, JobRecord>, StoreError> {
    rows.iter().map(|row| record(row).map(|job| (job.job.id.clone(), job))).collect()
}

/// A run's attempt number as stored.
fn attempt_number(attempt: u32) -> i32 {
    i32::try_from(attempt).unwrap_or(i32::MAX)
}

#[async_trait::async_trait]
impl JobStore for PgStore {
    async fn submit(&self, jobs: Vec<Submission>) -> Result<Vec<Submitted>, StoreError> {
        // One statement for the group (one commit, one round trip): its
        // rows arrive as arrays, one per column.
        // A job its front runs at once is recorded as claimed (`n_owner`).
        let insert = format!(
            "INSERT INTO offload_jobs (id, task, mode, params, input, client, idempotency_key, state, created_ms,
                 traceparent, interactive, attempts, owner, lease_until, started_ms, output, finished_ms, progress)
             SELECT n_id, n_task, n_mode, n_params, n_input, n_client, n_key,
                 CASE WHEN n_output IS NOT NULL THEN {SUCCEEDED} WHEN n_owner IS NULL THEN {QUEUED} ELSE {RUNNING} END,
                 {NOW_MS}, n_traceparent, n_interactive,
                 CASE WHEN n_owner IS NULL THEN 0 ELSE 1 END, n_owner, {NOW_MS} + n_lease,
                 CASE WHEN n_owner IS NOT NULL OR n_output IS NOT NULL THEN {NOW_MS} END,
                 n_output, CASE WHEN n_output IS NOT NULL THEN {NOW_MS} END,
                 CASE WHEN n_output IS NOT NULL THEN 1 ELSE 0 END
             FROM unnest($1::text[], $2::text[], $3::integer[], $4::text[], $5::bytea[], $6::text[], $7::text[],
                 $8::text[], $9::boolean[], $10::text[], $11::bigint[], $12::bytea[])
                 AS n(n_id, n_task, n_mode, n_params, n_input, n_client, n_key, n_traceparent, n_interactive,
                      n_owner, n_lease, n_output)
             ON CONFLICT DO NOTHING
             RETURNING {GET_COLUMNS},
                 CASE WHEN state = {QUEUED} THEN {} ELSE {} END",
            self.notify(Kind::Queued),
            self.notify(Kind::Changed)
        );
        let existing = format!("SELECT {COLUMNS} FROM offload_jobs WHERE client = $1 AND idempotency_key = $2");
        let (jobs, starts): (Vec<NewJob>, Vec<_>) = jobs.into_iter().map(|s| (s.job, s.start)).unzip();
        let owners: Vec<Option<&str>> = starts.iter().map(|s| s.run_by().map(|c| c.owner.as_str())).collect();
        let leases: Vec<Option<i64>> = starts.iter().map(|s| s.run_by().map(|c| millis(c.lease))).collect();
        let outputs: Vec<Option<&[u8]>> = starts.iter().map(Start::output).collect();
        let params = jobs
            .iter()
            .map(|job| serde_json::to_string(&job.params).map_err(|e| StoreError::Database(e.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        let column = |of: fn(&NewJob) -> &str| jobs.iter().map(of).collect::<Vec<_>>();
        let (ids, tasks, clients, traceparents) =
            (column(|j| &j.id), column(|j| &j.task), column(|j| &j.client), column(|j| &j.traceparent));
        let modes: Vec<i32> = jobs.iter().map(|job| job.mode).collect();
        let inputs: Vec<&[u8]> = jobs.iter().map(|job| job.input.as_ref()).collect();
        let keys: Vec<Option<&str>> = jobs.iter().map(|job| job.idempotency_key.as_deref()).collect();
        let interactive: Vec<bool> = jobs.iter().map(|job| job.priority == Priority::Interactive).collect();
        self.with(async |client| {
            let statement = client.prepare_cached(&insert).await?;
            let values: [&(dyn tokio_postgres::types::ToSql + Sync); 12] = [
                &ids,
                &tasks,
                &modes,
                &params,
                &inputs,
                &clients,
                &keys,
                &traceparents,
                &interactive,
                &owners,
                &leases,
                &outputs,
            ];
            let mut inserted = by_id(&client.query(&statement, &values).await?)?;
            let existing = client.prepare_cached(&existing).await?;
            let mut out = Vec::with_capacity(jobs.len());
            for job in &jobs {
                // Not inserted: the client's key is taken (perhaps by a Submit
                // on another front a moment ago, whose commit the insert
                // waited for, or earlier in this group).
                out.push(match (inserted.remove(&job.id), &job.idempotency_key) {
                    // Read back as recorded, but for the input: the caller's
                    // own, perhaps large, is not sent back over the wire.
                    (Some(mut recorded), _) => {
                        recorded.job.input = job.input.clone();
                        Submitted::New(recorded)
                    }
                    (None, Some(key)) => match client.query_opt(&existing, &[&job.client, key]).await? {
                        Some(row) => Submitted::Existing(record(&row)?),
                        None => return Err(StoreError::Database("a job's idempotency key is taken and gone".into())),
                    },
                    (None, None) => return Err(StoreError::Database(format!("job id {} is taken", job.id))),
                });
            }
            Ok(out)
        })
        .await
    }

    async fn get(&self, id: &str) -> Result<Option<JobRecord>, StoreError> {
        let sql = format!("SELECT {GET_COLUMNS} FROM offload_jobs WHERE id = $1");
        self.with(async |client| {
            let statement = client.prepare_cached(&sql).await?;
            client.query_opt(&statement, &[&id]).await?.as_ref().map(record).transpose()
        })
        .await
    }

    async fn input(&self, id: &str) -> Result<Option<Bytes>, StoreError> {
        self.with(async |client| {
            let statement = client.prepare_cached("SELECT input FROM offload_jobs WHERE id = $1").await?;
            let row = client.query_opt(&statement, &[&id]).await?;
            Ok(row.map(|row| row.try_get::<_, Vec<u8>>(0)).transpose()?.map(Bytes::from))
        })
        .await
    }

    async fn list(&self, filter: &Filter, limit: usize, after: Option<i64>) -> Result<Page, StoreError> {
        let sql = format!(
            "SELECT {LIST_COLUMNS} FROM offload_jobs
             WHERE ($1::integer IS NULL OR state = $1) AND ($2::text IS NULL OR client = $2) AND seq < $3
             ORDER BY seq DESC LIMIT $4"
        );
        let state = filter.state.map(|s| s.number() as i32);
        let (after, fetch) = (after.unwrap_or(i64::MAX), limit as i64 + 1);
        self.with(async |client| {
            let statement = client.prepare_cached(&sql).await?;
            let rows = client.query(&statement, &[&state, &filter.client, &after, &fetch]).await?;
            let rows = rows
                .iter()
                .map(|row| Ok((record(row)?, row.try_get::<_, i64>(18).map_err(StoreError::from)?)))
                .collect::<Result<Vec<_>, StoreError>>()?;
            Ok(Page::of(rows, limit))
        })
        .await
    }

    async fn claim(&self, owner: &str, lease: Duration, limit: usize) -> Result<Vec<JobRecord>, StoreError> {
        let sql = format!(
            "UPDATE offload_jobs SET state = {RUNNING}, attempts = attempts + 1, owner = $1,
                 lease_until = {NOW_MS} + $2, started_ms = {NOW_MS}
             WHERE seq IN (SELECT seq FROM offload_jobs WHERE state = {QUEUED} ORDER BY seq LIMIT $3
                           FOR UPDATE SKIP LOCKED)
             RETURNING {COLUMNS}, {}",
            self.notify(Kind::Changed)
        );
        let limit = limit as i64;
        self.with(async |client| {
            let statement = client.prepare_cached(&sql).await?;
            let rows = client.query(&statement, &[&owner, &millis(lease), &limit]).await?;
            let mut claimed = rows
                .iter()
                .map(|row| Ok((row.try_get::<_, i64>(18)?, record(row)?)))
                .collect::<Result<Vec<_>, StoreError>>()?;
            claimed.sort_by_key(|(seq, _)| *seq);
            Ok(claimed.into_iter().map(|(_, job)| job).collect())
        })
        .await
    }

    async fn renew(&self, id: &str, attempt: u32, lease: Duration) -> Result<bool, StoreError> {
        let sql = format!(
            "UPDATE offload_jobs SET lease_until = {NOW_MS} + $1
             WHERE id = $2 AND attempts = $3 AND state = {RUNNING}"
        );
        self.with(async |client| {
            let statement = client.prepare_cached(&sql).await?;
            Ok(client.execute(&statement, &[&millis(lease), &id, &attempt_number(attempt)]).await? == 1)
        })
        .await
    }

    async fn progress(&self, id: &str, attempt: u32, fraction: f64, message: &str) -> Result<bool, StoreError> {
        let sql = format!(
            "UPDATE offload_jobs SET progress = $1, progress_message = $2
             WHERE id = $3 AND attempts = $4 AND state = {RUNNING}
             RETURNING {}",
            self.notify(Kind::Changed)
        );
        self.with(async |client| {
            let statement = client.prepare_cached(&sql).await?;
            Ok(client.execute(&statement, &[&fraction, &message, &id, &attempt_number(attempt)]).await? == 1)
        })
        .await
    }

    async fn finish(&self, runs: Vec<Finished>) -> Result<Vec<Option<JobRecord>>, StoreError> {
        // One statement for the group, as for submits; each run's write is
        // fenced by its attempt, and one that no longer holds the job
        // returns no row.
        let sql = format!(
            "UPDATE offload_jobs SET state = f_state, output = f_output, error_code = f_code,
                 error_message = f_message, finished_ms = {NOW_MS}, owner = NULL, lease_until = NULL,
                 progress = CASE WHEN f_state = {} THEN 1.0 ELSE progress END
             FROM unnest($1::text[], $2::integer[], $3::integer[], $4::bytea[], $5::integer[], $6::text[])
                 AS f(f_id, f_attempt, f_state, f_output, f_code, f_message)
             WHERE id = f_id AND attempts = f_attempt AND state = {RUNNING}
             RETURNING {GET_COLUMNS}, {}",
            State::Succeeded.number(),
            self.notify(Kind::Changed)
        );
        let columns: Vec<_> = runs.iter().map(|run| run.result.columns()).collect();
        let ids: Vec<&str> = runs.iter().map(|run| run.id.as_str()).collect();
        let attempts: Vec<i32> = runs.iter().map(|run| attempt_number(run.attempt)).collect();
        let states: Vec<i32> = columns.iter().map(|(state, _, _)| state.number() as i32).collect();
        let outputs: Vec<Option<&[u8]>> = columns.iter().map(|(_, output, _)| *output).collect();
        let codes: Vec<Option<i32>> = columns.iter().map(|(_, _, failure)| failure.map(|f| f.code)).collect();
        let messages: Vec<Option<&str>> =
            columns.iter().map(|(_, _, failure)| failure.map(|f| f.message.as_str())).collect();
        self.with(async |client| {
            // Planned for each group, not once per connection: a plan made
            // while the table was small (a hash join over a scan of the
            // running rows) would be kept as it grew, each group then
            // reading every running row instead of looking up its own.
            let values: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 6] = [
                (&ids, Type::TEXT_ARRAY),
                (&attempts, Type::INT4_ARRAY),
                (&states, Type::INT4_ARRAY),
                (&outputs, Type::BYTEA_ARRAY),
                (&codes, Type::INT4_ARRAY),
                (&messages, Type::TEXT_ARRAY),
            ];
            let mut written = by_id(&client.query_typed(&sql, &values).await?)?;
            Ok(runs.iter().map(|run| written.remove(&run.id)).collect())
        })
        .await
    }

    async fn release(&self, id: &str, attempt: u32) -> Result<bool, StoreError> {
        let sql = format!(
            "UPDATE offload_jobs SET state = CASE WHEN cancel_requested THEN {} ELSE {QUEUED} END,
                 attempts = attempts - 1, error_code = CASE WHEN cancel_requested THEN {} END,
                 error_message = CASE WHEN cancel_requested THEN $3 END,
                 finished_ms = CASE WHEN cancel_requested THEN {NOW_MS} END, owner = NULL, lease_until = NULL
             WHERE id = $1 AND attempts = $2 AND state = {RUNNING}
             RETURNING {}",
            State::Cancelled.number(),
            tonic::Code::Cancelled as i32,
            self.notify(Kind::Queued)
        );
        self.with(async |client| {
            let statement = client.prepare_cached(&sql).await?;
            Ok(client.execute(&statement, &[&id, &attempt_number(attempt), &CANCELLED_HANDED_BACK]).await? == 1)
        })
        .await
    }

    async fn cancel(&self, id: &str) -> Result<Option<JobRecord>, StoreError> {
        let queued = format!(
            "UPDATE offload_jobs SET state = {}, error_code = {}, error_message = $1, finished_ms = {NOW_MS}
             WHERE id = $2 AND state = {QUEUED}
             RETURNING {}",
            State::Cancelled.number(),
            tonic::Code::Cancelled as i32,
            self.notify(Kind::Changed)
        );
        let running = format!(
            "UPDATE offload_jobs SET cancel_requested = TRUE WHERE id = $1 AND state = {RUNNING} RETURNING {}",
            self.notify(Kind::CancelAsked)
        );
        let now = format!("SELECT {COLUMNS} FROM offload_jobs WHERE id = $1");
        self.with(async |client| {
            let tx = client.transaction().await?;
            tx.execute(&queued, &[&CANCELLED_QUEUED, &id]).await?;
            tx.execute(&running, &[&id]).await?;
            let job = tx.query_opt(&now, &[&id]).await?.as_ref().map(record).transpose()?;
            tx.commit().await?;
            Ok(job)
        })
        .await
    }

    async fn cancel_requests(&self, owner: &str) -> Result<Vec<(String, u32)>, StoreError> {
        let sql = format!(
            "SELECT id, attempts FROM offload_jobs WHERE owner = $1 AND state = {RUNNING} AND cancel_requested"
        );
        self.with(async |client| {
            let statement = client.prepare_cached(&sql).await?;
            let rows = client.query(&statement, &[&owner]).await?;
            rows.iter()
                .map(|row| Ok((row.try_get(0)?, row.try_get::<_, i32>(1)?.max(0) as u32)))
                .collect::<Result<_, tokio_postgres::Error>>()
                .map_err(StoreError::from)
        })
        .await
    }

    async fn expire_leases(&self, max_attempts: u32) -> Result<usize, StoreError> {
        let expired = format!("state = {RUNNING} AND lease_until <= {NOW_MS}");
        let cancelled = format!(
            "UPDATE offload_jobs SET state = {}, error_code = {}, error_message = $1, finished_ms = {NOW_MS},
                 owner = NULL, lease_until = NULL
             WHERE {expired} AND cancel_requested
             RETURNING {}",
            State::Cancelled.number(),
            tonic::Code::Cancelled as i32,
            self.notify(Kind::Changed)
        );
        let failed = format!(
            "UPDATE offload_jobs SET state = {}, error_code = {},
                 error_message = $1 || attempts::text || ' of ' || $2, finished_ms = {NOW_MS},
                 owner = NULL, lease_until = NULL
             WHERE {expired} AND attempts >= $3
             RETURNING {}",
            State::Failed.number(),
            tonic::Code::Unavailable as i32,
            self.notify(Kind::Changed)
        );
        let queued = format!(
            "UPDATE offload_jobs SET state = {QUEUED}, owner = NULL, lease_until = NULL WHERE {expired}
             RETURNING {}",
            self.notify(Kind::Queued)
        );
        let (limit, max) = (max_attempts.to_string(), attempt_number(max_attempts));
        self.with(async |client| {
            let tx = client.transaction().await?;
            tx.execute(&cancelled, &[&CANCELLED_LOST]).await?;
            tx.execute(&failed, &[&LOST_ON_ATTEMPT, &limit, &max]).await?;
            let queued = tx.execute(&queued, &[]).await?;
            tx.commit().await?;
            Ok(queued as usize)
        })
        .await
    }

    async fn delete_finished(&self, retention: Duration) -> Result<usize, StoreError> {
        let sql = format!("DELETE FROM offload_jobs WHERE finished_ms IS NOT NULL AND finished_ms <= {NOW_MS} - $1");
        self.with(async |client| Ok(client.execute(&sql, &[&millis(retention)]).await? as usize)).await
    }

    async fn queued_of(&self, client: &str) -> Result<usize, StoreError> {
        let sql = format!("SELECT COUNT(*) FROM offload_jobs WHERE client = $1 AND state = {QUEUED}");
        self.with(async |db| {
            let statement = db.prepare_cached(&sql).await?;
            let count: i64 = db.query_one(&statement, &[&client]).await?.try_get(0)?;
            Ok(count.max(0) as usize)
        })
        .await
    }

    async fn stats(&self) -> Result<Stats, StoreError> {
        let oldest = format!("SELECT {NOW_MS} - MIN(created_ms) FROM offload_jobs WHERE state = {QUEUED}");
        self.with(async |client| {
            let rows =
                client.query("SELECT state, COUNT(*) FROM offload_jobs GROUP BY state ORDER BY state", &[]).await?;
            let counts = rows
                .iter()
                .map(|row| Ok((i64::from(row.try_get::<_, i32>(0)?), row.try_get::<_, i64>(1)?)))
                .collect::<Result<Vec<_>, tokio_postgres::Error>>()?;
            let oldest: Option<i64> = client.query_one(&oldest, &[]).await?.try_get(0)?;
            Ok(Stats::of(counts, oldest))
        })
        .await
    }

    fn notices(&self) -> Option<mpsc::Receiver<Notice>> {
        self.notices.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_front_skips_its_own_notices() {
        assert_eq!(parse("aa:q:job1", "bb"), Some(Notice { id: "job1".into(), kind: Kind::Queued }));
        assert_eq!(parse("aa:x:job1", "bb"), Some(Notice { id: "job1".into(), kind: Kind::CancelAsked }));
        let colons = Notice { id: "job:with:colons".into(), kind: Kind::Changed };
        assert_eq!(parse("aa:c:job:with:colons", "bb"), Some(colons));
        assert_eq!(parse("bb:q:job1", "bb"), None);
        assert_eq!(parse("garbage", "bb"), None);
    }
}
