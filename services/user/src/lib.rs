//! The user service: accounts, password credentials, refresh tokens, roles, tiers and the Ed25519 keys
//! that sign access tokens. It owns the `identity` schema and serves `parley.user.v1.UserService`.
//!
//! It must never return a password hash, a refresh token it did not just issue, or a private key, and
//! it answers a wrong email and a wrong password identically.

mod passwords;
mod sealing;
mod service;
mod signing;
mod storage;
mod validation;

use std::sync::Arc;

use parley_platform::Config;
use parley_proto::user::v1::user_service_server::UserServiceServer;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use service::UserService;
pub use storage::{IdentityPruned, prune};

/// The name this service reports in `grpc.health.v1`.
pub const HEALTH_NAME: &str = "parley.user.v1.UserService";

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/identity");

/// Applies the `identity` schema's migrations.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    parley_platform::db::migrate_schema(pool, "identity", &MIGRATOR).await
}

/// Errors inside the user service. Client mistakes carry a [`parley_platform::ServiceError`]; the rest
/// are logged where they are turned into a status and reach the client as a bare 500 or 503.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error(transparent)]
    Client(#[from] parley_platform::ServiceError),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("password hashing failed: {0}")]
    PasswordHash(String),
    #[error("token signing failed: {0}")]
    Signing(#[from] jsonwebtoken::errors::Error),
    #[error("signing key unusable: {0}")]
    SigningKey(String),
}

impl From<UserError> for tonic::Status {
    fn from(error: UserError) -> Self {
        let service_error = match error {
            UserError::Client(error) => error,
            UserError::Database(error) => error.into(),
            other => {
                tracing::error!(error = %other, "user service failure");
                parley_platform::ServiceError::internal()
            }
        };
        service_error.into()
    }
}

/// Serves the user service on `listener` until `shutdown` is cancelled.
pub async fn serve(service: UserService, listener: TcpListener, shutdown: CancellationToken) -> anyhow::Result<()> {
    let routes = tonic::service::Routes::new(UserServiceServer::new(service));
    parley_platform::grpc::serve("user", listener, routes, &[HEALTH_NAME], shutdown).await?;
    Ok(())
}

/// Builds the service: loads (or creates) the signing key.
pub async fn build(config: Arc<Config>, pool: PgPool) -> Result<UserService, UserError> {
    UserService::new(config, pool).await
}
