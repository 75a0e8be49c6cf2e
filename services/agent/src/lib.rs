//! The agent service: runs AI jobs. Any number of replicas pull from one durable JetStream consumer; for
//! each job an agent assembles the conversation's context, calls the model's providers in their
//! fallback order with streaming, publishes the reply's progress on the message's NATS subject, stores
//! the reply in chat (idempotent by message id), charges the tokens to quota and publishes a usage event.
//!
//! It owns no data. It must never acknowledge a job before its outcome is stored: an agent that dies
//! mid-job leaves the job to be redelivered and finished by another.

mod context;
pub mod provider;
mod worker;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use parley_platform::Config;
use parley_platform::grpc::ClientChannel;
use parley_proto::chat::v1::chat_service_client::ChatServiceClient;
use parley_proto::quota::v1::quota_service_client::QuotaServiceClient;
use tokio_util::sync::CancellationToken;

pub use worker::Agent;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Provider(#[from] provider::ProviderError),
    #[error("a peer service failed: {0}")]
    Peer(#[from] parley_platform::ServiceError),
    #[error("NATS failed: {0}")]
    Nats(String),
}

/// The providers every model's chain may use, built once from the configuration. A provider that cannot
/// be used (its API key variable is unset, say) is left out with an error in the log, and chains skip it.
pub fn build_providers(
    config: &Config,
) -> Result<BTreeMap<String, provider::OpenAiCompatible>, provider::ProviderError> {
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_millis(config.agent.connect_timeout_ms))
        .pool_idle_timeout(Duration::from_secs(90))
        .build()
        .map_err(|error| provider::ProviderError::Misconfigured(error.to_string()))?;
    let total = Duration::from_secs(config.agent.request_timeout_secs);
    let mut providers = BTreeMap::new();
    for (name, provider_config) in &config.providers {
        match provider::OpenAiCompatible::new(name, provider_config, http.clone(), total) {
            Ok(provider) => {
                providers.insert(name.clone(), provider);
            }
            Err(error) => tracing::error!(provider = %name, %error, "provider left out"),
        }
    }
    Ok(providers)
}

/// Runs the agent until `shutdown` is cancelled; jobs in flight then are handed back to JetStream.
pub async fn run(
    config: Arc<Config>,
    nats: async_nats::Client,
    chat: ChatServiceClient<ClientChannel>,
    quota: QuotaServiceClient<ClientChannel>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let providers = build_providers(&config)?;
    Agent::new(config, nats, chat, quota, providers).run(shutdown).await;
    Ok(())
}
