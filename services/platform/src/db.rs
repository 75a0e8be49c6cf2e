//! PostgreSQL pools and per-schema migrations.

use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};

/// A pooled connection idle for longer than this is pinged before it is handed out; one used more
/// recently has just proved itself (sqlx pings every connection as it comes back to the pool). Shorter
/// than any restart or failover of PostgreSQL, so a connection that an outage broke while it sat idle
/// is always checked before its next statement; long enough that a busy pool's connections, reused
/// within milliseconds, are not.
pub const PING_AFTER_IDLE: Duration = Duration::from_millis(100);

/// A pool that connects on first use, so a service starts (and reports not-ready) while the database
/// is down instead of crashing.
///
/// A connection is checked with a round trip before use only when it has been idle for
/// [`PING_AFTER_IDLE`], not on every acquire (sqlx's default): on a busy path that check was a third
/// of the round trips to PostgreSQL, one more wait before every statement.
pub fn pool_with(url: &str, max_connections: u32, acquire_timeout_ms: u64) -> Result<PgPool, sqlx::Error> {
    let options: PgConnectOptions = url.parse::<PgConnectOptions>()?.log_statements(tracing::log::LevelFilter::Debug);
    Ok(PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_millis(acquire_timeout_ms))
        .test_before_acquire(false)
        .before_acquire(|connection, meta| {
            Box::pin(async move {
                if meta.idle_for >= PING_AFTER_IDLE {
                    connection.ping().await?;
                }
                Ok(true)
            })
        })
        .connect_lazy_with(options))
}

/// Applies one service's migrations inside its own schema. The history table lives in that schema
/// too (`<schema>._sqlx_migrations`), so every service migrates independently of the others.
pub async fn migrate_schema(
    pool: &PgPool,
    schema: &'static str,
    migrator: &Migrator,
) -> Result<(), sqlx::migrate::MigrateError> {
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA IF NOT EXISTS {schema}"))).execute(pool).await?;
    let mut migrator = Migrator { migrations: migrator.migrations.clone(), ..Migrator::DEFAULT };
    migrator.dangerous_set_table_name(format!("{schema}._sqlx_migrations"));
    migrator.run(pool).await
}

/// Rows one statement of [`delete_in_batches`] deletes at most.
const DELETE_BATCH: i64 = 5_000;

/// Deletes the rows of `table` that `condition` selects (with `$1` bound to `bound`), a few thousand
/// per statement, so that retention on a large table never holds its locks or its WAL for long; the
/// number of rows deleted. For tables that are not partitioned (it deletes by `ctid`).
pub async fn delete_in_batches<T>(
    pool: &PgPool,
    table: &'static str,
    condition: &'static str,
    bound: T,
) -> Result<u64, sqlx::Error>
where
    T: for<'q> sqlx::Encode<'q, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Clone + Send + Sync + 'static,
{
    let statement = format!(
        // The condition again on the outer delete: a row changed since the inner select (a conversation
        // that just got a message) is checked as it is now.
        "DELETE FROM {table} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {table} WHERE {condition} LIMIT {DELETE_BATCH}))
           AND {condition}"
    );
    let mut deleted = 0;
    loop {
        let batch = sqlx::query(sqlx::AssertSqlSafe(statement.clone())).bind(bound.clone()).execute(pool).await?;
        deleted += batch.rows_affected();
        if batch.rows_affected() < DELETE_BATCH as u64 {
            return Ok(deleted);
        }
    }
}

/// Whether a database error means "the database is not reachable right now" (a 503) rather than a bug.
pub fn is_unavailable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::Io(_)
        | sqlx::Error::PoolClosed
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(error) => error.code().is_some_and(|code| is_unavailable_state(&code)),
        _ => false,
    }
}

/// SQLSTATEs with which a server says it cannot serve now, as opposed to a wrong statement: a
/// connection exception (class 08); an administrator's or a crash's shutdown, or a server still
/// starting (57P01, 57P02, 57P03: what a primary being stopped or restarted answers); too many
/// connections (53300); a read-only transaction (25006: the "primary" is a standby, as just after a
/// fail-over).
fn is_unavailable_state(code: &str) -> bool {
    code.starts_with("08") || code.starts_with("57P") || code == "53300" || code == "25006"
}

/// Creates the database named in `url` when it does not exist yet (for `parley dev` and tests on a
/// fresh machine), connecting to the server's `postgres` database to do it.
pub async fn ensure_database(url: &str) -> Result<(), sqlx::Error> {
    let options: PgConnectOptions = url.parse()?;
    let Some(name) = options.get_database().map(str::to_owned) else {
        return Ok(());
    };
    let admin = options.database("postgres");
    let mut connection = sqlx::PgConnection::connect_with(&admin).await?;
    let exists: Option<(i32,)> = sqlx::query_as("SELECT 1 FROM pg_database WHERE datname = $1")
        .bind(&name)
        .fetch_optional(&mut connection)
        .await?;
    if exists.is_none() {
        let quoted = name.replace('"', "\"\"");
        let created =
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{quoted}\""))).execute(&mut connection).await;
        // Another process may have created it in the meantime.
        if let Err(error) = created
            && !matches!(&error, sqlx::Error::Database(db) if db.code().as_deref() == Some("42P04"))
        {
            return Err(error);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shutdowns_and_lost_connections_are_unavailable_and_mistakes_are_not() {
        for code in ["57P01", "57P02", "57P03", "08006", "08003", "53300", "25006"] {
            assert!(is_unavailable_state(code), "{code}");
        }
        // A unique violation, a syntax error, a cancelled statement: not the server going away.
        for code in ["23505", "42601", "57014", "22021"] {
            assert!(!is_unavailable_state(code), "{code}");
        }
        assert!(is_unavailable(&sqlx::Error::PoolTimedOut));
        assert!(!is_unavailable(&sqlx::Error::RowNotFound));
    }
}
