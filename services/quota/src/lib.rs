//! The quota service: daily token budgets per user, by tier. It owns the `quota` schema (the durable
//! ledger of charges) and keeps hot per-day counters in Redis, rebuilt from the ledger whenever Redis
//! has lost them. It serves `parley.quota.v1.QuotaService` (reservations, budgets, releases) and settles
//! the charges that usage events carry (`settlements`).
//!
//! It must never grant an unlimited budget: when Redis cannot be reached it answers from the ledger
//! and holds users to a conservative share of their budget.

mod budget;
mod ledger;
pub mod metrics;
pub mod reserve;
mod service;
mod settlements;

use std::sync::Arc;

use parley_platform::Config;
use parley_proto::quota::v1::quota_service_server::QuotaServiceServer;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use ledger::prune;
pub use service::QuotaService;

/// The name this service reports in `grpc.health.v1`.
pub const HEALTH_NAME: &str = "parley.quota.v1.QuotaService";

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/quota");

/// Applies the `quota` schema's migrations.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    parley_platform::db::migrate_schema(pool, "quota", &MIGRATOR).await
}

#[derive(Debug, thiserror::Error)]
pub enum QuotaError {
    #[error(transparent)]
    Client(#[from] parley_platform::ServiceError),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("redis error: {0}")]
    Redis(String),
}

impl From<QuotaError> for tonic::Status {
    fn from(error: QuotaError) -> Self {
        let service_error = match error {
            QuotaError::Client(error) => error,
            QuotaError::Database(error) => error.into(),
            QuotaError::Redis(detail) => {
                tracing::warn!(%detail, "redis failure");
                parley_platform::ServiceError::unavailable("the budget store")
            }
        };
        service_error.into()
    }
}

/// Serves the gRPC API and settles usage events until `shutdown`.
pub async fn serve(
    config: Arc<Config>,
    pool: PgPool,
    redis: redis::aio::ConnectionManager,
    nats: async_nats::Client,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    metrics::describe();
    let names = parley_platform::nats::Names::new(&config.nats.prefix);
    let service = QuotaService::new(config, pool, redis);
    let settlements = settlements::Settlements::new(service.clone(), async_nats::jetstream::new(nats), names);
    let settling = tokio::spawn(settlements.run(shutdown.clone()));
    let routes = tonic::service::Routes::new(QuotaServiceServer::new(service));
    let served = parley_platform::grpc::serve("quota", listener, routes, &[HEALTH_NAME], shutdown.clone()).await;
    // The server stopped (shutdown, or it failed): the settlements stop with it.
    shutdown.cancel();
    settling.await?;
    served?;
    Ok(())
}
