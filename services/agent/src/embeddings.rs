//! Embeddings for the OpenAI-compatible `POST /v1/embeddings` (`parley.agent.v1.AgentService/Embed`):
//! the model's chain of providers in order, each call retried with its provider's breaker and key pool
//! as a reply's is ([`Agent::with_retries`]); the tokens are charged and reported like a completion's
//! (input only), after the caller has its vectors.

use std::future::Future;
use std::time::Duration;

use parley_platform::events::AiJob;

use crate::ProviderHandle;
use crate::chain::{Attempt, Failure, Operation};
use crate::provider::{EmbedOptions, Embedded, ProviderError};
use crate::worker::Agent;

/// One embeddings call to one provider.
struct EmbedAttempt<'a> {
    provider: &'a ProviderHandle,
    model: &'a str,
    inputs: &'a [String],
    options: EmbedOptions<'a>,
}

impl Attempt for EmbedAttempt<'_> {
    type Output = Embedded;

    const OPERATION: Operation = Operation::Embeddings;

    fn run<'k>(
        &'k mut self,
        key: Option<&'k str>,
    ) -> impl Future<Output = (Result<Embedded, ProviderError>, String)> + Send + 'k {
        let Self { provider, model, inputs, options } = *self;
        // Nothing of an embeddings call reaches the caller before it is whole.
        async move { (provider.client.embed(key, model, inputs, options).await, String::new()) }
    }

    fn tokens(embedded: &Embedded) -> (i64, i64) {
        (embedded.input_tokens, 0)
    }
}

/// Vectors, and where and how fast they were made.
pub(crate) struct Embeddings {
    pub(crate) embedded: Embedded,
    pub(crate) provider: String,
    pub(crate) provider_model: String,
    pub(crate) elapsed: Duration,
}

impl Agent {
    /// Tries each provider/model pair of the job's model in order, as a reply does: the next on a
    /// failure worth retrying elsewhere, none after one that is not.
    pub(crate) async fn embed(
        &self,
        job: &AiJob,
        inputs: &[String],
        options: EmbedOptions<'_>,
    ) -> Result<Embeddings, ProviderError> {
        let chain = self.config.models.get(&job.model).map(|model| model.chain.as_slice()).unwrap_or_default();
        let mut last_error = ProviderError::Misconfigured(format!("model {} has no usable provider", job.model));
        for target in chain {
            let Some(provider) = self.providers.get(&target.provider) else {
                continue;
            };
            let attempt = EmbedAttempt { provider, model: &target.model, inputs, options };
            match self.with_retries(provider, &target.model, attempt).await {
                Ok((embedded, elapsed)) => {
                    let (provider, provider_model) = (provider.client.name.clone(), target.model.clone());
                    return Ok(Embeddings { embedded, provider, provider_model, elapsed });
                }
                Err(Failure { error, .. }) => {
                    let retryable = error.is_retryable();
                    last_error = error;
                    if !retryable {
                        break;
                    }
                }
            }
        }
        Err(last_error)
    }
}
