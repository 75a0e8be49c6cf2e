//! The agent service: runs AI jobs. Any number of replicas pull from one durable JetStream consumer; for
//! each job an agent assembles the conversation's context, calls the model's providers in their
//! fallback order with streaming, publishes the reply's progress on the message's NATS subject, stores
//! the reply in chat (idempotent by message id), charges the tokens to quota and publishes a usage event.
//!
//! It owns no data. It must never acknowledge a job before its outcome is stored: an agent that dies
//! mid-job leaves the job to be redelivered and finished by another.

mod accounting;
mod cache;
mod chain;
mod completions;
mod context;
mod embeddings;
pub mod metrics;
pub mod provider;
mod resilience;
mod stops;
mod summaries;
mod titles;
mod usage;
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

/// A provider as the agent uses it: the HTTP client, its circuit breaker and its key pool.
pub struct ProviderHandle {
    pub client: provider::HttpProvider,
    pub breaker: resilience::Breaker,
    pub keys: resilience::KeyPool,
}

/// The providers every model's chain may use, built once from the configuration. A provider that cannot
/// be used (none of its key variables is set, say) is left out with an error in the log; chains skip it.
pub fn build_providers(config: &Config) -> Result<BTreeMap<String, ProviderHandle>, provider::ProviderError> {
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_millis(config.agent.connect_timeout_ms))
        .pool_idle_timeout(Duration::from_secs(90))
        .build()
        .map_err(|error| provider::ProviderError::Misconfigured(error.to_string()))?;
    let timeouts = provider::Timeouts {
        first_token: Duration::from_millis(config.agent.time_to_first_token_timeout_ms),
        total: Duration::from_secs(config.agent.request_timeout_secs),
    };
    let mut providers = BTreeMap::new();
    for (name, provider_config) in &config.providers {
        let variables = provider_config.key_variables();
        let keys: Vec<String> =
            variables.iter().filter_map(|variable| config.provider_keys.get(variable).map(str::to_owned)).collect();
        if !variables.is_empty() && keys.is_empty() {
            tracing::error!(provider = %name, ?variables, "provider left out: none of its API key variables is set");
            continue;
        }
        match provider::HttpProvider::new(name, provider_config, http.clone(), timeouts) {
            Ok(client) => {
                let handle = ProviderHandle {
                    client,
                    breaker: resilience::Breaker::new(name, config.agent.breaker.clone()),
                    keys: resilience::KeyPool::new(name, keys),
                };
                providers.insert(name.clone(), handle);
            }
            Err(error) => tracing::error!(provider = %name, %error, "provider left out"),
        }
    }
    Ok(providers)
}

/// The name the agent's gRPC server reports as serving in `grpc.health.v1`.
pub const HEALTH_NAME: &str = "parley.agent.v1.AgentService";

/// Runs the agent until `shutdown` is cancelled: the job loop and, on `listener`, the stateless
/// completions server. Then jobs in flight are handed back to JetStream, and completions in flight
/// finish and are accounted for.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    config: Arc<Config>,
    providers: Arc<BTreeMap<String, ProviderHandle>>,
    nats: async_nats::Client,
    redis: Option<redis::aio::ConnectionManager>,
    chat: ChatServiceClient<ClientChannel>,
    quota: QuotaServiceClient<ClientChannel>,
    listener: Option<tokio::net::TcpListener>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    metrics::describe();
    let names = parley_platform::nats::Names::new(&config.nats.prefix);
    let backlog = tokio::spawn(parley_platform::nats::export_consumer_backlog(
        async_nats::jetstream::new(nats.clone()),
        names.jobs_stream(),
        names.agent_consumer(),
        std::time::Duration::from_secs(5),
        shutdown.clone(),
    ));
    let agent = Agent::new(config, nats, chat, quota, providers, redis);
    let completions = completions::Completions::new(agent.clone());
    let tasks = completions.tasks();
    let server = listener.map(|listener| {
        let routes = tonic::service::Routes::new(
            parley_proto::agent::v1::agent_service_server::AgentServiceServer::new(completions),
        );
        tokio::spawn(parley_platform::grpc::serve("agent", listener, routes, &[HEALTH_NAME], shutdown.clone()))
    });
    agent.run(shutdown.clone()).await;
    shutdown.cancel();
    backlog.await?;
    if let Some(server) = server {
        server.await??;
    }
    tasks.close();
    tasks.wait().await;
    Ok(())
}

impl From<&provider::Completion> for cache::CachedReply {
    fn from(completion: &provider::Completion) -> Self {
        cache::CachedReply {
            content: completion.content.clone(),
            input_tokens: completion.input_tokens,
            output_tokens: completion.output_tokens,
        }
    }
}

/// The state of every provider's circuit breaker, for readiness reports.
pub fn breaker_states(providers: &BTreeMap<String, ProviderHandle>) -> BTreeMap<String, &'static str> {
    providers.iter().map(|(name, handle)| (name.clone(), handle.breaker.state().as_str())).collect()
}
