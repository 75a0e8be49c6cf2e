//! The job loop: pull, run, and acknowledge only once the outcome is stored.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind};
use futures::StreamExt;
use parley_platform::events::{AiJob, MessageEvent, StoredReply, UsageEvent};
use parley_platform::grpc::ClientChannel;
use parley_platform::nats::Names;
use parley_platform::telemetry::{self, NatsHeaderCarrier, NatsHeaderReader};
use parley_platform::{Config, ErrorCode, ServiceError};
use parley_proto::chat::v1 as chat_pb;
use parley_proto::chat::v1::chat_service_client::ChatServiceClient;
use parley_proto::quota::v1 as quota_pb;
use parley_proto::quota::v1::quota_service_client::QuotaServiceClient;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::AgentError;
use crate::ProviderHandle;
use crate::cache::{CachedReply, ResponseCache};
use crate::context::{TokenCounter, compose, fit_prompt, summary_budget, summary_request};
use crate::provider::{Completion, ProviderError, Sampling};
use crate::resilience::{KeyOutcome, backoff};

/// What to do with a job's JetStream message once its run ends.
#[derive(Debug)]
enum Outcome {
    /// The outcome is stored: acknowledge.
    Done,
    /// Try again later (the message is redelivered after the delay).
    Retry(Duration),
}

#[derive(Clone)]
pub struct Agent {
    pub(crate) config: Arc<Config>,
    nats: async_nats::Client,
    jetstream: jetstream::Context,
    names: Names,
    chat: ChatServiceClient<ClientChannel>,
    quota: QuotaServiceClient<ClientChannel>,
    providers: Arc<BTreeMap<String, ProviderHandle>>,
    events: Arc<tokio::sync::OnceCell<jetstream::stream::Stream>>,
    pub(crate) cache: Arc<ResponseCache>,
}

/// Longest running summary, in tokens: it bounds what every later prompt of a long thread carries.
const SUMMARY_MAX_TOKENS: u32 = 400;

/// One call to one provider.
struct ProviderCall<'a> {
    provider: &'a ProviderHandle,
    key: Option<&'a str>,
    model: &'a str,
    prompt: &'a [crate::provider::PromptMessage],
    sampling: Sampling,
}

/// A failed model call, with the text that had already been streamed to clients.
pub(crate) struct Failure {
    pub(crate) error: ProviderError,
    pub(crate) streamed: String,
}

/// How a reply was had.
pub(crate) enum Generated {
    /// From the model.
    Fresh(Answer),
    /// From the response cache, and how (`hit`, `coalesced`, `fail_open`).
    Cached(CachedReply, &'static str),
    Failed(Failure),
}

/// Where a reply's pieces go as they arrive.
#[derive(Clone, Copy)]
pub(crate) enum DeltaSink<'a> {
    /// The message's NATS subject: a job's reply, which any gateway may be streaming.
    Subject,
    /// Straight back to the caller of a stateless completion.
    Caller(&'a mpsc::UnboundedSender<Result<parley_proto::agent::v1::CompleteEvent, tonic::Status>>),
}

/// A successful model call, with where it was made.
pub(crate) struct Answer {
    pub(crate) completion: Completion,
    pub(crate) provider: String,
    pub(crate) elapsed: Duration,
    pub(crate) cache_hit: bool,
}

impl Agent {
    pub fn new(
        config: Arc<Config>,
        nats: async_nats::Client,
        chat: ChatServiceClient<ClientChannel>,
        quota: QuotaServiceClient<ClientChannel>,
        providers: Arc<BTreeMap<String, ProviderHandle>>,
        redis: Option<redis::aio::ConnectionManager>,
    ) -> Self {
        let names = Names::new(&config.nats.prefix);
        let jetstream = jetstream::new(nats.clone());
        let cache = Arc::new(ResponseCache::new(&config.agent.cache, redis, &config.redis.key_prefix));
        Self {
            config,
            nats,
            jetstream,
            names,
            chat,
            quota,
            providers,
            events: Arc::new(tokio::sync::OnceCell::new()),
            cache,
        }
    }

    /// Pulls and runs jobs until `shutdown`; then hands back (naks) what it holds and returns once every
    /// job task has ended.
    pub async fn run(self, shutdown: CancellationToken) {
        let concurrency = self.config.agent.concurrency;
        let permits = Arc::new(Semaphore::new(concurrency));
        let mut tasks = JoinSet::new();
        let mut backoff = Duration::from_millis(200);
        'connect: while !shutdown.is_cancelled() {
            let messages = match self.subscribe(concurrency).await {
                Ok(messages) => messages,
                Err(error) => {
                    tracing::warn!(%error, "job consumer not ready; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            backoff = Duration::from_millis(200);
            tokio::pin!(messages);
            loop {
                let permit = tokio::select! {
                    _ = shutdown.cancelled() => break 'connect,
                    permit = permits.clone().acquire_owned() => match permit {
                        Ok(permit) => permit,
                        Err(_) => break 'connect,
                    },
                };
                let next = tokio::select! {
                    _ = shutdown.cancelled() => break 'connect,
                    next = messages.next() => next,
                };
                match next {
                    Some(Ok(message)) => {
                        let agent = self.clone();
                        let shutdown = shutdown.clone();
                        tasks.spawn(async move {
                            agent.handle(message, shutdown).await;
                            drop(permit);
                        });
                    }
                    Some(Err(error)) => tracing::warn!(%error, "pulling jobs failed"),
                    None => continue 'connect,
                }
                while tasks.try_join_next().is_some() {}
            }
        }
        while tasks.join_next().await.is_some() {}
        tracing::debug!("agent stopped");
    }

    async fn subscribe(&self, batch: usize) -> Result<jetstream::consumer::pull::Stream, async_nats::Error> {
        parley_platform::nats::ensure_usage_stream(&self.jetstream, &self.names).await?;
        parley_platform::nats::ensure_dead_jobs_stream(&self.jetstream, &self.names).await?;
        let events =
            parley_platform::nats::ensure_events_stream(&self.jetstream, &self.names, &self.config.nats).await?;
        let _already_set = self.events.set(events);
        let consumer =
            parley_platform::nats::ensure_agent_consumer(&self.jetstream, &self.names, &self.config.nats).await?;
        Ok(consumer.stream().max_messages_per_batch(batch).messages().await?)
    }

    /// Runs one job, keeping it alive with progress acks, and acks or naks it by the outcome.
    async fn handle(&self, message: jetstream::Message, shutdown: CancellationToken) {
        let job: AiJob = match serde_json::from_slice(&message.payload) {
            Ok(job) => job,
            Err(error) => {
                tracing::error!(%error, "a malformed job goes to the dead-letter stream");
                if self.dead_letter(&message.payload, &format!("malformed job: {error}")).await.is_ok() {
                    let _ignored = message.ack_with(AckKind::Term).await;
                }
                return;
            }
        };
        let delivered = message.info().map(|info| info.delivered).unwrap_or(1);
        let span = tracing::info_span!(
            "agent.job",
            service = "agent",
            job_id = %job.job_id,
            message_id = %job.message_id,
            delivered,
            trace_id = tracing::field::Empty,
        );
        if let Some(headers) = &message.headers {
            telemetry::set_parent_from(&span, &NatsHeaderReader(headers));
        }
        span.record("trace_id", telemetry::trace_id_of(&span));
        async {
            let work = self.run_job(&job, delivered);
            tokio::pin!(work);
            let mut keepalive =
                tokio::time::interval(Duration::from_secs(self.config.nats.job_ack_wait_secs).div_f64(3.0));
            keepalive.tick().await;
            let outcome = loop {
                tokio::select! {
                    outcome = &mut work => break Some(outcome),
                    _ = keepalive.tick() => {
                        if let Err(error) = message.ack_with(AckKind::Progress).await {
                            tracing::warn!(%error, "progress ack failed");
                        }
                    }
                    _ = shutdown.cancelled() => break None,
                }
            };
            let (ack, label) = match outcome {
                Some(Outcome::Done) => (AckKind::Ack, "done"),
                Some(Outcome::Retry(delay)) => (AckKind::Nak(Some(delay)), "retry"),
                None => (AckKind::Nak(None), "handed_back"),
            };
            metrics::counter!("parley_agent_jobs_total", "outcome" => label).increment(1);
            if let Err(error) = message.ack_with(ack).await {
                tracing::warn!(%error, outcome = label, "acknowledging the job failed; it will be redelivered");
            }
        }
        .instrument(span)
        .await;
    }

    async fn run_job(&self, job: &AiJob, delivered: i64) -> Outcome {
        let retry = Outcome::Retry(retry_delay(delivered));
        let request = chat_pb::GetJobContextRequest { message_id: job.message_id.to_string(), history_limit: 0 };
        let context = match self.chat.clone().get_job_context(request).await {
            Ok(response) => response.into_inner(),
            Err(status) => {
                let error = ServiceError::from(status);
                if error.code == ErrorCode::NotFound {
                    tracing::info!("the message is gone (conversation deleted); dropping the job");
                    return Outcome::Done;
                }
                tracing::warn!(%error, "could not load the job's context");
                return retry;
            }
        };
        let status = context.assistant_message.as_ref().map(|m| m.status.as_str()).unwrap_or_default();
        match status {
            "completed" => {
                tracing::info!("reply already stored (redelivered job); finishing its accounting");
                let message = context.assistant_message.unwrap_or_default();
                let usage = message.usage.unwrap_or_default();
                let completion = Completion {
                    content: message.content,
                    input_tokens: usage.input_tokens,
                    output_tokens: usage.output_tokens,
                    time_to_first_token: None,
                };
                let answer =
                    Answer { completion, provider: "unknown".to_owned(), cache_hit: false, elapsed: Duration::ZERO };
                return self.account(job, &context.model, &answer).await.map_or(retry, |()| Outcome::Done);
            }
            "failed" => return Outcome::Done,
            _ => {}
        }
        let Some(model) = self.config.models.get(&context.model) else {
            let detail = format!("model {:?} is not configured", context.model);
            return self.fail(job, "invalid_request", &detail, None).await.map_or(retry, |()| Outcome::Done);
        };
        let prompt = self.assemble_prompt(job, &context, &context.model, model).await;
        let answering_model = self.route(&context.model, model, &prompt);
        if !self.reserve_for(job, model, &prompt, None).await {
            let detail = "the token budget does not cover this prompt and the longest reply";
            return self
                .fail(job, ErrorCode::QuotaExceeded.as_str(), detail, None)
                .await
                .map_or(retry, |()| Outcome::Done);
        }
        match self.generate(job, delivered, &context.model, &answering_model, &prompt, DeltaSink::Subject).await {
            Generated::Fresh(answer) => match self.store(job, &answering_model, &answer).await {
                Ok(()) => Outcome::Done,
                Err(error) => {
                    tracing::warn!(%error, "could not store the reply; retrying the job");
                    retry
                }
            },
            Generated::Cached(reply, how) => self
                .answer_from_cache(job, delivered, &answering_model, reply, how)
                .await
                .map_or(retry, |()| Outcome::Done),
            // Clients have already seen part of a reply: another attempt would contradict it, so the
            // message ends failed, keeping what was generated.
            Generated::Failed(Failure { error, streamed }) if !streamed.is_empty() => {
                tracing::warn!(%error, "the model failed mid-reply");
                let detail = format!("the model stopped mid-reply: {error}");
                self.fail(job, ErrorCode::UpstreamUnavailable.as_str(), &detail, Some(streamed))
                    .await
                    .map_or(retry, |()| Outcome::Done)
            }
            Generated::Failed(Failure { error, .. }) => {
                if error.is_retryable() && delivered < self.config.nats.job_max_deliver {
                    tracing::warn!(%error, "every provider failed; the job will be retried");
                    return retry;
                }
                tracing::warn!(%error, "giving up on the job");
                let detail = format!("the model could not answer: {error}");
                self.fail(job, ErrorCode::UpstreamUnavailable.as_str(), &detail, None)
                    .await
                    .map_or(retry, |()| Outcome::Done)
            }
        }
    }

    /// A reply to `prompt`: from the response cache when the request allows it, else from the model's
    /// provider chain (identical cacheable requests in flight sharing one call), else, when every
    /// provider failed, a cached answer to the same prompt (fail-open) unless the client said no-store.
    pub(crate) async fn generate(
        &self,
        job: &AiJob,
        delivered: i64,
        requested_model: &str,
        answering_model: &str,
        prompt: &[crate::provider::PromptMessage],
        sink: DeltaSink<'_>,
    ) -> Generated {
        let cache_key = crate::cache::key(requested_model, prompt, self.config.agent.max_output_tokens);
        let cache_on = self.config.agent.cache.enabled;
        let cacheable = cache_on && job.is_cacheable();
        if cacheable
            && job.cache.read
            && let Some(hit) = self.cache.get(&cache_key).await
        {
            return Generated::Cached(hit, "hit");
        }
        let outcome = if cacheable {
            let call = || async {
                let result = self.call_chain(job, delivered, answering_model, prompt, sink).await;
                let reply = result.as_ref().ok().map(|answer| CachedReply::from(&answer.completion));
                (result, reply)
            };
            match self.cache.coalesce(&cache_key, call).await {
                Ok(result) => {
                    metrics::counter!("parley_llm_cache_requests_total", "outcome" => "miss").increment(1);
                    result
                }
                Err(Some(shared)) => return Generated::Cached(shared, "coalesced"),
                Err(None) => self.call_chain(job, delivered, answering_model, prompt, sink).await,
            }
        } else {
            metrics::counter!("parley_llm_cache_requests_total", "outcome" => "not_cacheable").increment(1);
            self.call_chain(job, delivered, answering_model, prompt, sink).await
        };
        match outcome {
            Ok(answer) => {
                if cacheable && job.cache.write {
                    self.cache.put(&cache_key, &CachedReply::from(&answer.completion)).await;
                }
                Generated::Fresh(answer)
            }
            Err(failure) if !failure.streamed.is_empty() => Generated::Failed(failure),
            Err(failure) => {
                // Fail-open: with every provider down, a cached answer to the same prompt beats none,
                // whatever the temperature, unless the client forbade caching (no-store).
                if cache_on
                    && job.cache.write
                    && let Some(stale) = self.cache.get(&cache_key).await
                {
                    tracing::warn!(error = %failure.error, "every provider failed; answering from the cache");
                    return Generated::Cached(stale, "fail_open");
                }
                Generated::Failed(failure)
            }
        }
    }

    /// The prompt for a job. When the thread no longer fits the window, the messages that fall out are
    /// folded into the conversation's running summary (stored in chat and reused by later jobs), so
    /// long threads keep their gist while each call's prompt stays within the window.
    async fn assemble_prompt(
        &self,
        job: &AiJob,
        context: &chat_pb::JobContext,
        requested: &str,
        model: &parley_platform::config::ModelConfig,
    ) -> Vec<crate::provider::PromptMessage> {
        let counter = TokenCounter::for_model(&self.config, model);
        let reserved = self.config.agent.max_output_tokens;
        let system = context.system_prompt.as_deref();
        let fitted =
            fit_prompt(system, context.summary.as_deref(), &context.history, model.context_window, reserved, &counter);
        if fitted.dropped == 0 {
            return fitted.prompt;
        }
        // Decide what the new summary must cover with room kept for the summary itself.
        let summary_room = summary_budget(model.context_window, SUMMARY_MAX_TOKENS);
        let refit = fit_prompt(system, None, &context.history, model.context_window, reserved + summary_room, &counter);
        let (dropped, kept) =
            context.history.split_at(refit.dropped.max(1).min(context.history.len().saturating_sub(1)));
        let Some((summary, tokens)) =
            self.summarize(context.summary.as_deref(), dropped, requested, model, summary_room).await
        else {
            return fitted.prompt;
        };
        if let Some(until) = dropped.last() {
            // The user pays for the summary call too, once per summary (a redelivered job that folds the
            // same messages again is not charged twice).
            let charge = quota_pb::ChargeRequest {
                user_id: job.user_id.to_string(),
                tokens,
                reference_id: format!("summary:{}", until.id),
            };
            if let Err(status) = self.quota.clone().charge(charge).await {
                tracing::warn!(code = ?status.code(), "could not charge the summary call");
            }
            let request = chat_pb::UpdateSummaryRequest {
                conversation_id: context.conversation_id.clone(),
                summary: summary.clone(),
                until_message_id: until.id.clone(),
            };
            if let Err(status) = self.chat.clone().update_summary(request).await {
                tracing::warn!(code = ?status.code(), "could not store the running summary");
            }
        }
        compose(system, Some(&summary), kept)
    }

    /// Folds `dropped` into the running summary with the summary model, with the tokens the call used;
    /// `None` if no provider answered (the prompt then simply leaves those messages out).
    async fn summarize(
        &self,
        previous: Option<&str>,
        dropped: &[chat_pb::Message],
        requested: &str,
        model: &parley_platform::config::ModelConfig,
        max_tokens: u32,
    ) -> Option<(String, i64)> {
        let name = self
            .config
            .agent
            .summary_model
            .clone()
            .or_else(|| model.router.as_ref().map(|router| router.model.clone()))
            .unwrap_or_else(|| requested.to_owned());
        let summary_model = self.config.models.get(&name)?;
        let request = summary_request(previous, dropped);
        let sampling = Sampling { max_tokens, temperature: Some(0.0) };
        for target in &summary_model.chain {
            let Some(provider) = self.providers.get(&target.provider) else {
                continue;
            };
            if !provider.breaker.allow() {
                continue;
            }
            let key = provider.keys.pick();
            let secret = key.as_ref().map(|(_, secret)| secret.as_str());
            match provider.client.stream_chat(secret, &target.model, &request, sampling, &mut |_| {}).await {
                Ok(completion) => {
                    provider.breaker.record_success();
                    metrics::counter!("parley_agent_summaries_total", "model" => name.clone()).increment(1);
                    let tokens = completion.input_tokens.max(0) + completion.output_tokens.max(0);
                    return Some((completion.content, tokens));
                }
                Err(error) => {
                    if error.is_provider_fault() {
                        provider.breaker.record_failure();
                    } else {
                        provider.breaker.record_success_if_probing();
                    }
                    tracing::warn!(%error, provider = %target.provider, "summary call failed");
                }
            }
        }
        None
    }

    /// The model that answers: the requested one, or its router's cheaper model for a simple request.
    pub(crate) fn route(
        &self,
        requested: &str,
        model: &parley_platform::config::ModelConfig,
        prompt: &[crate::provider::PromptMessage],
    ) -> String {
        let Some(router) = &model.router else {
            return requested.to_owned();
        };
        let chars: usize = prompt.iter().map(|message| message.content.chars().count()).sum();
        let messages = prompt.iter().filter(|message| message.role != "system").count();
        if chars <= router.max_prompt_chars && messages <= router.max_messages {
            metrics::counter!("parley_llm_routed_total", "from" => requested.to_owned(), "to" => router.model.clone())
                .increment(1);
            tracing::debug!(from = requested, to = %router.model, "simple request routed to the cheaper model");
            return router.model.clone();
        }
        requested.to_owned()
    }

    /// Answers a job with a cached reply: one delta with the whole text, then the usual storing and
    /// accounting (no tokens are charged for a reply nobody generated).
    async fn answer_from_cache(
        &self,
        job: &AiJob,
        delivered: i64,
        model: &str,
        reply: CachedReply,
        how: &'static str,
    ) -> Result<(), AgentError> {
        metrics::counter!("parley_llm_cache_requests_total", "outcome" => how).increment(1);
        let index = self.next_delta_index(job.message_id, delivered).await;
        let subject = self.names.message_events_subject(job.message_id);
        let delta = MessageEvent::Delta { message_id: job.message_id, index, text: reply.content.clone() };
        self.publish_event(&subject, &delta).await;
        let completion = Completion {
            content: reply.content,
            input_tokens: reply.input_tokens,
            output_tokens: reply.output_tokens,
            time_to_first_token: None,
        };
        let answer = Answer { completion, provider: "cache".to_owned(), elapsed: Duration::ZERO, cache_hit: true };
        self.store(job, model, &answer).await
    }

    /// Tries each provider/model pair of the model's chain in order, retrying each on retryable failures
    /// with backoff, skipping providers whose circuit is open.
    pub(crate) async fn call_chain(
        &self,
        job: &AiJob,
        delivered: i64,
        model_name: &str,
        prompt: &[crate::provider::PromptMessage],
        sink: DeltaSink<'_>,
    ) -> Result<Answer, Failure> {
        let chain = self.config.models.get(model_name).map(|model| model.chain.as_slice()).unwrap_or_default();
        let mut last_error = ProviderError::Misconfigured(format!("model {model_name} has no usable provider"));
        let mut delta_index = self.next_delta_index(job.message_id, delivered).await;
        for target in chain {
            let Some(provider) = self.providers.get(&target.provider) else {
                continue;
            };
            match self.call_with_retries(provider, &target.model, prompt, job, &mut delta_index, sink).await {
                Ok(answer) => return Ok(answer),
                Err(failure) if !failure.streamed.is_empty() => return Err(failure),
                Err(Failure { error, .. }) => {
                    let retryable = error.is_retryable();
                    last_error = error;
                    if !retryable {
                        break;
                    }
                }
            }
        }
        Err(Failure { error: last_error, streamed: String::new() })
    }

    /// Calls one provider, retrying retryable failures with jittered exponential backoff (or the
    /// provider's `Retry-After`), and moving to the next key on 401, 403 and 429.
    async fn call_with_retries(
        &self,
        provider: &ProviderHandle,
        model: &str,
        prompt: &[crate::provider::PromptMessage],
        job: &AiJob,
        delta_index: &mut u64,
        sink: DeltaSink<'_>,
    ) -> Result<Answer, Failure> {
        let retry = &self.config.agent.retry;
        let sampling = Sampling { max_tokens: self.config.agent.max_output_tokens, temperature: job.temperature };
        let started = Instant::now();
        let name = provider.client.name.clone();
        let mut attempt = 0;
        loop {
            if !provider.breaker.allow() {
                metrics::counter!("parley_llm_requests_total", "provider" => name.clone(), "model" => model.to_owned(), "outcome" => "circuit_open").increment(1);
                let error = ProviderError::Status {
                    status: 503,
                    message: format!("circuit open for {name}"),
                    retry_after: None,
                };
                return Err(Failure { error, streamed: String::new() });
            }
            attempt += 1;
            let key = provider.keys.pick();
            let span = tracing::info_span!(
                "gen_ai.chat",
                otel.kind = "client",
                gen_ai.operation.name = "chat",
                gen_ai.system = %name,
                gen_ai.request.model = %model,
                gen_ai.usage.input_tokens = tracing::field::Empty,
                gen_ai.usage.output_tokens = tracing::field::Empty,
                attempt,
            );
            let call_started = Instant::now();
            let (result, streamed) = self
                .call_streaming(
                    ProviderCall {
                        provider,
                        key: key.as_ref().map(|(_, secret)| secret.as_str()),
                        model,
                        prompt,
                        sampling,
                    },
                    job.message_id,
                    delta_index,
                    sink,
                )
                .instrument(span.clone())
                .await;
            let elapsed = call_started.elapsed();
            let labels = [("provider", name.clone()), ("model", model.to_owned())];
            metrics::histogram!("parley_llm_request_duration_seconds", &labels).record(elapsed.as_secs_f64());
            let error = match result {
                Ok(completion) => {
                    provider.breaker.record_success();
                    if let Some((index, _)) = &key {
                        provider.keys.report(*index, KeyOutcome::Worked);
                    }
                    span.record("gen_ai.usage.input_tokens", completion.input_tokens);
                    span.record("gen_ai.usage.output_tokens", completion.output_tokens);
                    metrics::counter!("parley_llm_requests_total", "provider" => name.clone(), "model" => model.to_owned(), "outcome" => "ok").increment(1);
                    if let Some(ttft) = completion.time_to_first_token {
                        metrics::histogram!("parley_llm_time_to_first_token_seconds", &labels)
                            .record(ttft.as_secs_f64());
                    }
                    metrics::counter!("parley_llm_tokens_total", "provider" => name.clone(), "model" => model.to_owned(), "direction" => "input").increment(completion.input_tokens.max(0) as u64);
                    metrics::counter!("parley_llm_tokens_total", "provider" => name.clone(), "model" => model.to_owned(), "direction" => "output").increment(completion.output_tokens.max(0) as u64);
                    return Ok(Answer { completion, provider: name, elapsed, cache_hit: false });
                }
                Err(error) => error,
            };
            metrics::counter!("parley_llm_requests_total", "provider" => name.clone(), "model" => model.to_owned(), "outcome" => "error").increment(1);
            tracing::warn!(%error, provider = %name, %model, attempt, "provider call failed");
            if error.is_provider_fault() {
                provider.breaker.record_failure();
            } else {
                // A 4xx says nothing about the provider's health: a probe that got one is over.
                provider.breaker.record_success_if_probing();
            }
            let key_outcome = match error.status() {
                Some(401 | 403) => Some(KeyOutcome::Rejected),
                Some(429) => Some(KeyOutcome::Throttled),
                _ => None,
            };
            if let (Some((index, _)), Some(outcome)) = (&key, key_outcome) {
                provider.keys.report(*index, outcome);
            }
            // Clients saw part of this reply: no retry may contradict it.
            if !streamed.is_empty() || !error.is_retryable() {
                return Err(Failure { error, streamed });
            }
            // A rejected key with no other key to try will not start working on a retry.
            if key_outcome == Some(KeyOutcome::Rejected) && provider.keys.len() <= 1 {
                return Err(Failure { error, streamed });
            }
            let another_key = key_outcome.is_some() && provider.keys.len() > 1;
            let delay = if another_key { Duration::ZERO } else { backoff(retry, attempt, error.retry_after()) };
            let out_of_time = started.elapsed() + delay > Duration::from_millis(retry.max_elapsed_ms);
            if attempt >= retry.max_attempts || out_of_time {
                return Err(Failure { error, streamed });
            }
            metrics::counter!("parley_llm_retries_total", "provider" => name.clone()).increment(1);
            tokio::time::sleep(delay).await;
        }
    }

    /// Where this attempt's delta numbering starts: after the last delta an earlier attempt published
    /// (an agent that died mid-reply), so clients resuming by `Last-Event-ID` never see an index twice.
    /// A job's first delivery has no earlier attempt, so it starts at 0 without asking JetStream.
    async fn next_delta_index(&self, message_id: Uuid, delivered: i64) -> u64 {
        if delivered <= 1 {
            return 0;
        }
        let Some(events) = self.events.get() else {
            return 0;
        };
        let subject = self.names.message_events_subject(message_id);
        match events.get_last_raw_message_by_subject(&subject).await {
            Ok(last) => match serde_json::from_slice::<MessageEvent>(&last.payload) {
                Ok(MessageEvent::Delta { index, .. }) => index + 1,
                _ => 0,
            },
            Err(_) => 0,
        }
    }

    /// One streaming call; each delta is published on the message's subject as it arrives.
    async fn call_streaming(
        &self,
        call: ProviderCall<'_>,
        message_id: Uuid,
        delta_index: &mut u64,
        sink: DeltaSink<'_>,
    ) -> (Result<Completion, ProviderError>, String) {
        let ProviderCall { provider, key, model, prompt, sampling } = call;
        let (deltas, mut received) = mpsc::unbounded_channel::<String>();
        let call = async move {
            let mut on_delta = move |text: &str| {
                let _receiver_gone = deltas.send(text.to_owned());
            };
            provider.client.stream_chat(key, model, prompt, sampling, &mut on_delta).await
        };
        let subject = self.names.message_events_subject(message_id);
        let forward = async {
            let mut streamed = String::new();
            while let Some(text) = received.recv().await {
                streamed.push_str(&text);
                match sink {
                    DeltaSink::Subject => {
                        let event = MessageEvent::Delta { message_id, index: *delta_index, text };
                        self.publish_event(&subject, &event).await;
                    }
                    DeltaSink::Caller(caller) => {
                        // A caller that hung up cancels nothing: the reply is finished and charged.
                        let _caller_gone = caller.send(Ok(crate::completions::delta(text)));
                    }
                }
                *delta_index += 1;
            }
            streamed
        };
        tokio::join!(call, forward)
    }

    async fn publish_event(&self, subject: &str, event: &MessageEvent) {
        let Ok(payload) = serde_json::to_vec(event) else {
            return;
        };
        if let Err(error) = self.nats.publish(subject.to_owned(), payload.into()).await {
            tracing::debug!(%error, "could not publish a message event");
        }
    }

    /// Stores the reply, then charges and reports it.
    async fn store(&self, job: &AiJob, model: &str, answer: &Answer) -> Result<(), AgentError> {
        let request = chat_pb::CompleteMessageRequest {
            message_id: job.message_id.to_string(),
            content: answer.completion.content.clone(),
            usage: Some(chat_pb::Usage {
                input_tokens: answer.completion.input_tokens,
                output_tokens: answer.completion.output_tokens,
            }),
            model: model.to_owned(),
        };
        let stored = self.chat.clone().complete_message(request).await.map_err(ServiceError::from)?.into_inner();
        if !stored.changed {
            tracing::info!("another agent stored this reply first; keeping theirs");
        }
        // The reply is stored, so clients may have it at once, as stored. The accounting follows before
        // the job is acknowledged (a crash in between redelivers the job, which redoes it); until it
        // settles, the user's reservation (at least what the reply cost) still holds their budget.
        self.announce_completed(job, stored.message.as_ref().and_then(stored_reply)).await;
        self.charge_and_report(job, model, answer).await
    }

    /// Charges the tokens, reports the usage event and announces completion: for a redelivered job
    /// whose reply is already stored. Every step is idempotent by message id.
    async fn account(&self, job: &AiJob, model: &str, answer: &Answer) -> Result<(), AgentError> {
        self.charge_and_report(job, model, answer).await?;
        self.announce_completed(job, None).await;
        Ok(())
    }

    async fn announce_completed(&self, job: &AiJob, reply: Option<StoredReply>) {
        let subject = self.names.message_events_subject(job.message_id);
        self.publish_event(&subject, &MessageEvent::Completed { message_id: job.message_id, reply }).await;
    }

    /// Settles the reservation with the tokens used and publishes the usage event, both idempotent by
    /// the job's message id.
    pub(crate) async fn charge_and_report(&self, job: &AiJob, model: &str, answer: &Answer) -> Result<(), AgentError> {
        // A cached reply cost no model tokens, so it costs the user none of their budget either.
        let tokens =
            if answer.cache_hit { 0 } else { answer.completion.input_tokens + answer.completion.output_tokens };
        let event = UsageEvent {
            event_id: job.message_id,
            user_id: job.user_id,
            conversation_id: job.conversation_id,
            message_id: job.message_id,
            model: model.to_owned(),
            provider: answer.provider.clone(),
            input_tokens: answer.completion.input_tokens,
            output_tokens: answer.completion.output_tokens,
            latency_ms: answer.elapsed.as_millis() as i64,
            time_to_first_token_ms: answer.completion.time_to_first_token.map(|ttft| ttft.as_millis() as i64),
            cache_hit: answer.cache_hit,
            outcome: "completed".to_owned(),
            occurred_at_ms: (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64,
        };
        // Independent and each idempotent: the charge and the report travel side by side.
        tokio::try_join!(self.settle(job, tokens), self.publish_usage(&event))?;
        Ok(())
    }

    /// Raises the job's reservation to what this call can cost at most (the prompt as counted, plus the
    /// longest reply), so the budget holds even when the thread's history makes the prompt far longer
    /// than the gateway's estimate. False when the budget cannot cover it.
    pub(crate) async fn reserve_for(
        &self,
        job: &AiJob,
        model: &parley_platform::config::ModelConfig,
        prompt: &[crate::provider::PromptMessage],
        held: Option<i64>,
    ) -> bool {
        let Some(reservation_id) = job.reservation_id else {
            return true;
        };
        let counter = crate::context::TokenCounter::for_model(&self.config, model);
        let prompt_tokens: i64 = prompt.iter().map(|message| i64::from(counter.count(&message.content))).sum();
        if held.is_some_and(|held| prompt_tokens + i64::from(self.config.agent.max_output_tokens) <= held) {
            return true;
        }
        let request = quota_pb::ReserveRequest {
            user_id: job.user_id.to_string(),
            tier: job.tier.clone(),
            reservation_id: reservation_id.to_string(),
            tokens: prompt_tokens + i64::from(self.config.agent.max_output_tokens),
        };
        match self.quota.clone().reserve(request).await {
            Ok(reservation) => reservation.into_inner().granted,
            Err(status) => {
                // The gateway's reservation stands; the budget store being unreachable must not stop replies.
                tracing::warn!(code = ?status.code(), "could not raise the reservation");
                true
            }
        }
    }

    /// Charges `tokens` for the job: settling its reservation (which releases the rest of it), or, for a
    /// job queued without one, a plain charge. Idempotent either way.
    pub(crate) async fn settle(&self, job: &AiJob, tokens: i64) -> Result<(), AgentError> {
        match job.reservation_id {
            Some(reservation_id) => {
                let request = quota_pb::SettleRequest {
                    user_id: job.user_id.to_string(),
                    reservation_id: reservation_id.to_string(),
                    tokens,
                };
                self.quota.clone().settle(request).await.map_err(ServiceError::from)?;
            }
            None if tokens == 0 => {}
            None => {
                let request = quota_pb::ChargeRequest {
                    user_id: job.user_id.to_string(),
                    tokens,
                    reference_id: job.message_id.to_string(),
                };
                self.quota.clone().charge(request).await.map_err(ServiceError::from)?;
            }
        }
        Ok(())
    }

    async fn publish_usage(&self, event: &UsageEvent) -> Result<(), AgentError> {
        let payload = serde_json::to_vec(event).map_err(|error| AgentError::Nats(error.to_string()))?;
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, event.event_id.to_string().as_str());
        telemetry::inject_current(&mut NatsHeaderCarrier(&mut headers));
        let ack = self
            .jetstream
            .publish_with_headers(self.names.usage_subject(), headers, payload.into())
            .await
            .map_err(|error| AgentError::Nats(error.to_string()))?;
        ack.await.map_err(|error| AgentError::Nats(error.to_string()))?;
        Ok(())
    }

    /// Keeps a job that was given up on in the dead-letter stream, with the reason in a header.
    async fn dead_letter(&self, payload: &[u8], reason: &str) -> Result<(), AgentError> {
        let mut headers = async_nats::HeaderMap::new();
        let reason: String = reason.chars().filter(|c| !c.is_control()).take(500).collect();
        headers.insert("Parley-Dead-Reason", reason.as_str());
        let ack = self
            .jetstream
            .publish_with_headers(self.names.dead_jobs_subject(), headers, payload.to_vec().into())
            .await
            .map_err(|error| AgentError::Nats(error.to_string()))?;
        ack.await.map_err(|error| AgentError::Nats(error.to_string()))?;
        metrics::counter!("parley_agent_dead_jobs_total").increment(1);
        Ok(())
    }

    /// Ends the message `failed` with a reason, announces it, and keeps the job in the dead-letter stream.
    async fn fail(
        &self,
        job: &AiJob,
        code: &str,
        detail: &str,
        partial_content: Option<String>,
    ) -> Result<(), AgentError> {
        let request = chat_pb::FailMessageRequest {
            message_id: job.message_id.to_string(),
            code: code.to_owned(),
            detail: detail.to_owned(),
            partial_content,
        };
        self.chat.clone().fail_message(request).await.map_err(ServiceError::from)?;
        if let Ok(payload) = serde_json::to_vec(job) {
            self.dead_letter(&payload, &format!("{code}: {detail}")).await?;
        }
        // Nothing was delivered: the reservation goes back at once instead of waiting to expire.
        self.settle(job, 0).await?;
        let subject = self.names.message_events_subject(job.message_id);
        let event =
            MessageEvent::Failed { message_id: job.message_id, code: code.to_owned(), detail: detail.to_owned() };
        self.publish_event(&subject, &event).await;
        Ok(())
    }
}

/// The stored reply for a `completed` event; `None` when chat's answer is not a completed message.
fn stored_reply(message: &chat_pb::Message) -> Option<StoredReply> {
    let nanos =
        |at| parley_platform::timestamps::from_proto(at).and_then(|at| i64::try_from(at.unix_timestamp_nanos()).ok());
    if message.status != "completed" {
        return None;
    }
    let usage = message.usage.unwrap_or_default();
    Some(StoredReply {
        conversation_id: Uuid::parse_str(&message.conversation_id).ok()?,
        content: message.content.clone(),
        model: message.model.clone(),
        input_tokens: usage.input_tokens,
        output_tokens: usage.output_tokens,
        created_at_ns: nanos(message.created_at.as_ref()?)?,
        completed_at_ns: message.completed_at.as_ref().and_then(nanos),
    })
}

/// Exponential redelivery delay: 1 s, 2 s, 4 s ... capped at 30 s.
fn retry_delay(delivered: i64) -> Duration {
    let exponent = delivered.clamp(1, 6) - 1;
    Duration::from_secs(1u64 << exponent).min(Duration::from_secs(30))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_grow_and_are_capped() {
        assert_eq!(retry_delay(1), Duration::from_secs(1));
        assert_eq!(retry_delay(2), Duration::from_secs(2));
        assert_eq!(retry_delay(5), Duration::from_secs(16));
        assert_eq!(retry_delay(50), Duration::from_secs(30));
    }
}
