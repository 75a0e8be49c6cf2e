//! The analytics service: consumes usage events from JetStream into the `analytics` schema (idempotent
//! by event id), prices them with the configured per-model prices, and answers usage queries over gRPC
//! (`parley.analytics.v1.AnalyticsService`).
//!
//! It must never lose an acknowledged event: a message is acknowledged only after its row is stored.

mod feedback;
mod ingest;
pub mod metrics;
mod retention;
mod service;

use std::sync::Arc;

use parley_platform::Config;
use parley_platform::replicas::Database;
use parley_proto::analytics::v1::analytics_service_server::AnalyticsServiceServer;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use retention::{AnalyticsPruned, drop_old_usage_partitions, prune};
pub use service::AnalyticsService;

/// The name this service reports in `grpc.health.v1`.
pub const HEALTH_NAME: &str = "parley.analytics.v1.AnalyticsService";

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/analytics");

/// Applies the `analytics` schema's migrations.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    parley_platform::db::migrate_schema(pool, "analytics", &MIGRATOR).await
}

#[derive(Debug, thiserror::Error)]
pub enum AnalyticsError {
    #[error(transparent)]
    Client(#[from] parley_platform::ServiceError),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

impl From<AnalyticsError> for tonic::Status {
    fn from(error: AnalyticsError) -> Self {
        let service_error = match error {
            AnalyticsError::Client(error) => error,
            AnalyticsError::Database(error) => error.into(),
        };
        service_error.into()
    }
}

/// Serves usage queries and runs the event ingester until `shutdown` is cancelled.
pub async fn serve(
    config: Arc<Config>,
    database: Arc<Database>,
    nats: async_nats::Client,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    metrics::describe();
    let pool = database.primary().clone();
    let ingester = ingest::Ingester::new(config.clone(), pool, async_nats::jetstream::new(nats));
    let alerts_task = tokio::spawn(ingester.alert_publisher().run(shutdown.clone()));
    let names = parley_platform::nats::Names::new(&config.nats.prefix);
    let backlog_task = tokio::spawn(parley_platform::nats::export_consumer_backlog(
        ingester.jetstream(),
        names.usage_stream(),
        names.analytics_consumer(),
        std::time::Duration::from_secs(5),
        shutdown.clone(),
    ));
    let ingest_task = tokio::spawn(ingester.run(shutdown.clone()));
    let routes = tonic::service::Routes::new(AnalyticsServiceServer::new(AnalyticsService::new(
        database,
        &config.chat.cursor_secret,
    )));
    let served = parley_platform::grpc::serve("analytics", listener, routes, &[HEALTH_NAME], shutdown.clone()).await;
    shutdown.cancel();
    ingest_task.await?;
    alerts_task.await?;
    backlog_task.await?;
    served?;
    Ok(())
}
