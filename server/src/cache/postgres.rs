//! The shared result store: a PostgreSQL table every front reads and
//! writes, so that a result made on one host is a hit on every other. It is
//! the job store's database unless `--cache-store` names another.
//!
//! Entries expire after `--cache-ttl-secs` (the database's clock). Every
//! [`TRIM_EVERY`], one front at a time deletes expired rows and, when the
//! table holds more than `--cache-max-bytes` of outputs, the oldest stored
//! until it does not: a hit is not written back (that would make every read
//! a write), so the order is by age, not by use. Losing the table loses
//! nothing but time: every row can be made again.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;

use super::{CacheStore, Key, StoreError, Stored};
use crate::pg::{Database, NOW_MS, PgError};

/// How often expired and excess rows are deleted.
pub const TRIM_EVERY: Duration = Duration::from_secs(10);

/// The table, and its index by age for the trim.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS offload_cache (
    key BYTEA PRIMARY KEY,
    task TEXT NOT NULL,
    output BYTEA NOT NULL,
    bytes BIGINT NOT NULL,
    stored_ms BIGINT NOT NULL,
    expires_ms BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS offload_cache_by_age ON offload_cache (stored_ms);
";

/// An arbitrary constant of Offload's cache: the advisory lock under which
/// fronts make the table, and under which one of them trims it.
const LOCK: i64 = 7301554207614285648;

impl From<PgError> for StoreError {
    fn from(err: PgError) -> Self {
        StoreError(err.to_string())
    }
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(err: tokio_postgres::Error) -> Self {
        PgError::from(err).into()
    }
}

/// Results in a PostgreSQL table.
#[derive(Debug)]
pub struct PgCacheStore {
    db: Arc<Database>,
    ttl: Duration,
    max_bytes: usize,
    /// Output bytes the table held at the last trim.
    held: Arc<AtomicUsize>,
    trimmer: tokio::task::JoinHandle<()>,
}

impl Drop for PgCacheStore {
    fn drop(&mut self) {
        self.trimmer.abort();
    }
}

impl PgCacheStore {
    /// Connects to `url`, making the table if need be, and starts trimming
    /// it to `max_bytes` every [`TRIM_EVERY`].
    pub async fn connect(url: &str, max_bytes: usize, ttl: Duration) -> Result<Self, StoreError> {
        let db = Arc::new(Database::connect(url, "cache", SCHEMA, LOCK).await?);
        let held = Arc::new(AtomicUsize::new(0));
        let trimmer = tokio::spawn(trim_every(Arc::clone(&db), max_bytes, Arc::clone(&held)));
        Ok(Self { db, ttl, max_bytes, held, trimmer })
    }

    /// The database, for the log.
    pub fn describe(&self) -> &str {
        self.db.describe()
    }
}

/// Trims `store` now rather than at its next turn (see the module docs).
pub async fn trim_now(store: &PgCacheStore) -> Result<(u64, usize), StoreError> {
    let trimmed = trim(&store.db, store.max_bytes).await?;
    store.held.store(trimmed.1, Ordering::Relaxed);
    Ok(trimmed)
}

#[async_trait::async_trait]
impl CacheStore for PgCacheStore {
    async fn get(&self, key: &Key) -> Result<Option<Bytes>, StoreError> {
        let sql = format!("SELECT output FROM offload_cache WHERE key = $1 AND expires_ms > {NOW_MS}");
        self.db
            .with(async |client| {
                let statement = client.prepare_cached(&sql).await?;
                let row = client.query_opt(&statement, &[&&key.0[..]]).await?;
                Ok(row.map(|row| row.try_get::<_, Vec<u8>>(0)).transpose()?.map(Bytes::from))
            })
            .await
    }

    async fn put(&self, key: Key, task: &'static str, output: Bytes) -> Result<Stored, StoreError> {
        let sql = format!(
            "INSERT INTO offload_cache (key, task, output, bytes, stored_ms, expires_ms)
             VALUES ($1, $2, $3, $4, {NOW_MS}, {NOW_MS} + $5)
             ON CONFLICT (key) DO UPDATE SET task = EXCLUDED.task, output = EXCLUDED.output,
                 bytes = EXCLUDED.bytes, stored_ms = EXCLUDED.stored_ms, expires_ms = EXCLUDED.expires_ms"
        );
        let (bytes, ttl) = (output.len() as i64, i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX / 2));
        self.db
            .with(async |client| {
                let statement = client.prepare_cached(&sql).await?;
                client.execute(&statement, &[&&key.0[..], &task, &output.as_ref(), &bytes, &ttl]).await?;
                // Rows go at the next trim, by whichever front trims.
                Ok(Stored::default())
            })
            .await
    }

    fn bytes_held(&self) -> Option<usize> {
        Some(self.held.load(Ordering::Relaxed))
    }
}

/// Trims the table every [`TRIM_EVERY`] (see the module's docs).
async fn trim_every(db: Arc<Database>, max_bytes: usize, held: Arc<AtomicUsize>) {
    let mut every = tokio::time::interval_at(tokio::time::Instant::now() + TRIM_EVERY, TRIM_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        match trim(&db, max_bytes).await {
            Ok((deleted, bytes)) => {
                held.store(bytes, Ordering::Relaxed);
                if deleted > 0 {
                    tracing::debug!(deleted, bytes, "result cache trimmed");
                }
            }
            Err(err) => tracing::warn!(error = %err, "cannot trim the result cache"),
        }
    }
}

/// Deletes expired rows, then the oldest beyond `max_bytes`, unless
/// another front is at it; returns the rows deleted and the bytes left.
async fn trim(db: &Database, max_bytes: usize) -> Result<(u64, usize), StoreError> {
    let expired = format!("DELETE FROM offload_cache WHERE expires_ms <= {NOW_MS}");
    let excess = "DELETE FROM offload_cache WHERE key IN (
                      SELECT key FROM (
                          SELECT key, SUM(bytes) OVER (ORDER BY stored_ms DESC, key) AS newer FROM offload_cache
                      ) AS by_age WHERE newer > $1::bigint)";
    let max_bytes = i64::try_from(max_bytes).unwrap_or(i64::MAX);
    let total = "SELECT COALESCE(SUM(bytes), 0)::bigint FROM offload_cache";
    db.with(async |client| {
        let tx = client.transaction().await?;
        let mut deleted = 0;
        let mine: bool = tx.query_one("SELECT pg_try_advisory_xact_lock($1)", &[&LOCK]).await?.try_get(0)?;
        if mine {
            deleted += tx.execute(&expired, &[]).await?;
        }
        let mut bytes: i64 = tx.query_one(total, &[]).await?.try_get(0)?;
        if mine && bytes > max_bytes {
            deleted += tx.execute(excess, &[&max_bytes]).await?;
            bytes = tx.query_one(total, &[]).await?.try_get(0)?;
        }
        tx.commit().await?;
        Ok((deleted, usize::try_from(bytes).unwrap_or(0)))
    })
    .await
}
