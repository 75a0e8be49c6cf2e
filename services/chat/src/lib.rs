//! The chat service: conversations and messages, and the transactional outbox that turns a sent message
//! into an AI job on JetStream. It owns the `chat` schema and serves `parley.chat.v1.ChatService`.
//!
//! Every user-facing call is scoped by the caller's user id: another user's conversation or message is
//! NOT_FOUND, never PERMISSION_DENIED. A message is stored before its job exists, and its job is
//! published at least once ([`relay`]); completing a message twice changes nothing.

pub mod metrics;
pub mod relay;
mod search;
mod service;
mod storage;

use std::sync::Arc;

use parley_platform::Config;
use parley_platform::nats::Names;
use parley_platform::replicas::WriteMarks;
use parley_proto::chat::v1::chat_service_server::ChatServiceServer;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use service::ChatService;
pub use storage::{Archived, ChatPruned, Sealed, archive_idle, prune, seal_stored};

/// The name this service reports in `grpc.health.v1`.
pub const HEALTH_NAME: &str = "parley.chat.v1.ChatService";

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/chat");

/// Applies the `chat` schema's migrations.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    parley_platform::db::migrate_schema(pool, "chat", &MIGRATOR).await
}

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error(transparent)]
    Client(#[from] parley_platform::ServiceError),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("stored data is inconsistent: {0}")]
    Inconsistent(String),
}

impl From<ChatError> for tonic::Status {
    fn from(error: ChatError) -> Self {
        let service_error = match error {
            ChatError::Client(error) => error,
            ChatError::Database(error) => error.into(),
            ChatError::Inconsistent(detail) => {
                tracing::error!(%detail, "chat data inconsistent");
                parley_platform::ServiceError::internal()
            }
        };
        service_error.into()
    }
}

/// Serves the chat service and runs its outbox relay until `shutdown` is cancelled.
pub async fn serve(
    config: Arc<Config>,
    marks: WriteMarks,
    nats: async_nats::Client,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    metrics::describe();
    let names = Names::new(&config.nats.prefix);
    let pool = marks.database().primary().clone();
    let relay = relay::OutboxRelay::new(pool, async_nats::jetstream::new(nats), names.clone());
    let keyring = parley_platform::envelope::Keyring::new(&config.chat.content_keys)?;
    let service = ChatService::new(config, marks, keyring, names, relay.queue());
    let server =
        ChatServiceServer::new(service).max_decoding_message_size(parley_platform::grpc::MAX_CHAT_MESSAGE_BYTES);
    let routes = tonic::service::Routes::new(server);
    let relay_task = tokio::spawn(relay.run(shutdown.clone()));
    let served = parley_platform::grpc::serve("chat", listener, routes, &[HEALTH_NAME], shutdown.clone()).await;
    shutdown.cancel();
    relay_task.await?;
    served?;
    Ok(())
}
