//! PostgreSQL connections, for what fronts share through a database: the
//! job store (`jobs/postgres.rs`) and the result cache
//! (`cache/postgres.rs`). One place for the URL's checks, the pool, TCP
//! keepalives, the bound on every call, and making tables once among
//! fronts starting together.

use std::{str::FromStr, time::Duration};

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use tokio_postgres::NoTls;

/// Connections a front holds at most, per use.
const POOL_SIZE: usize = 16;
/// The longest any one call may take: a database that stopped answering (a
/// cut link) fails calls rather than hanging them.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the first connection may take to come up (the database may
/// start with the fronts, as in docker-compose).
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The database server's clock, in Unix milliseconds: every front agrees
/// on it, whatever its own host's clock says.
pub const NOW_MS: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";

/// Whether `spec` names a PostgreSQL database.
pub fn is_url(spec: &str) -> bool {
    spec.starts_with("postgres://") || spec.starts_with("postgresql://")
}

/// What went wrong with the database, said with the server's own words.
#[derive(Debug, Clone, thiserror::Error)]
#[error("PostgreSQL: {0}")]
pub struct PgError(pub String);

impl From<tokio_postgres::Error> for PgError {
    fn from(err: tokio_postgres::Error) -> Self {
        // The server's own message (a constraint, a missing permission) says
        // more than the driver's summary "db error".
        match err.as_db_error() {
            Some(db) => PgError(db.message().to_string()),
            None => PgError(err.to_string()),
        }
    }
}

impl From<deadpool_postgres::PoolError> for PgError {
    fn from(err: deadpool_postgres::PoolError) -> Self {
        PgError(err.to_string())
    }
}

/// A pool of connections to one database.
#[derive(Debug)]
pub struct Database {
    pool: Pool,
    config: tokio_postgres::Config,
    /// Where, for the log (no password).
    described: String,
}

impl Database {
    /// Connects to the database `url` names, for `purpose` (said in the log
    /// while it waits for the database), running `schema` (idempotent DDL)
    /// under the advisory lock `lock`, so that fronts starting together do
    /// not collide.
    pub async fn connect(url: &str, purpose: &str, schema: &str, lock: i64) -> Result<Self, PgError> {
        let mut config = tokio_postgres::Config::from_str(url)
            .map_err(|e| PgError(format!("{} is not a PostgreSQL URL: {e}", redacted(url))))?;
        // Refused now, saying why, rather than retried until the start-up
        // bound runs out on a handshake that cannot succeed.
        if config.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
            return Err(PgError(format!(
                "{}: sslmode=require asks for TLS, which this version does not speak to PostgreSQL; \
                 reach the database over a private network or a local TLS proxy, with sslmode=disable or prefer",
                redacted(url)
            )));
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        // A peer gone without a word (a host lost, a link cut) is noticed
        // within about half a minute rather than the kernel's two hours.
        config.keepalives(true).keepalives_idle(Duration::from_secs(10)).keepalives_interval(Duration::from_secs(5));
        config.keepalives_retries(3);
        if config.get_application_name().is_none() {
            config.application_name("offload");
        }
        let described = describe(&config);
        let manager =
            Manager::from_config(config.clone(), NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(CALL_TIMEOUT))
            .create_timeout(Some(CALL_TIMEOUT))
            .build()
            .map_err(|e| PgError(e.to_string()))?;
        let started = tokio::time::Instant::now();
        loop {
            match make_schema(&pool, schema, lock).await {
                Ok(()) => break,
                Err(err) if started.elapsed() < START_TIMEOUT => {
                    tracing::warn!(database = %described, error = %err, "waiting for the {purpose} database");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(err) => return Err(err),
            }
        }
        Ok(Self { pool, config, described })
    }

    /// The database, for the log: host, port and name, never the password.
    pub fn describe(&self) -> &str {
        &self.described
    }

    /// Its connection settings, for a connection of its own (LISTEN).
    pub fn config(&self) -> &tokio_postgres::Config {
        &self.config
    }

    /// Runs `work` with a pooled connection, bounded by [`CALL_TIMEOUT`].
    pub async fn with<T, E: From<PgError>>(&self, work: impl AsyncFnOnce(&mut Object) -> Result<T, E>) -> Result<T, E> {
        let call = async {
            let mut client = self.pool.get().await.map_err(PgError::from)?;
            work(&mut client).await
        };
        tokio::time::timeout(CALL_TIMEOUT, call).await.unwrap_or_else(|_| {
            Err(PgError(format!("{} did not answer within {} s", self.described, CALL_TIMEOUT.as_secs())).into())
        })
    }
}

/// Runs `schema` once among fronts starting together.
async fn make_schema(pool: &Pool, schema: &str, lock: i64) -> Result<(), PgError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    // `CREATE ... IF NOT EXISTS` run by two sessions at once can still
    // collide: the lock orders them.
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&lock]).await?;
    tx.batch_execute(schema).await?;
    tx.commit().await?;
    Ok(())
}

/// `url` with its password hidden.
fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => match url[scheme + 3..at].split_once(':') {
            Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
            None => url.to_string(),
        },
        _ => url.to_string(),
    }
}

/// "host:port/dbname" of `config`.
fn describe(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        Some(tokio_postgres::config::Host::Unix(path)) => path.display().to_string(),
        None => "localhost".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let user = config.get_user().unwrap_or("");
    format!("{host}:{port}/{}", config.get_dbname().unwrap_or(user))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_kept_out_of_the_log() {
        assert_eq!(redacted("postgres://offload:s3cret@db:5432/jobs"), "postgres://offload:***@db:5432/jobs");
        assert_eq!(redacted("postgres://db/jobs"), "postgres://db/jobs");
        let config = tokio_postgres::Config::from_str("postgres://offload:s3cret@db:6543/jobs").unwrap();
        assert_eq!(describe(&config), "db:6543/jobs");
    }

    #[tokio::test]
    async fn a_url_asking_for_tls_is_refused_saying_so() {
        let url = "postgres://offload:s3cret@127.0.0.1:1/jobs?sslmode=require";
        let err = Database::connect(url, "test", "", 1).await.unwrap_err();
        let said = err.to_string();
        assert!(said.contains("sslmode=require asks for TLS") && !said.contains("s3cret"), "{said}");
    }
}
