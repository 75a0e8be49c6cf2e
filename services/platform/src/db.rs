//! PostgreSQL pools and per-schema migrations.

use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};

/// A pool that connects on first use, so a service starts (and reports not-ready) while the database
/// is down instead of crashing.
pub fn pool_with(url: &str, max_connections: u32, acquire_timeout_ms: u64) -> Result<PgPool, sqlx::Error> {
    let options: PgConnectOptions = url.parse::<PgConnectOptions>()?.log_statements(tracing::log::LevelFilter::Debug);
    Ok(PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_millis(acquire_timeout_ms))
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

/// Whether a database error means "the database is not reachable right now" (a 503) rather than a bug.
pub fn is_unavailable(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed | sqlx::Error::Tls(_))
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
