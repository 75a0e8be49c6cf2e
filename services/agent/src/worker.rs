//! The job loop: pull, run, and acknowledge only once the outcome is stored.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use futures::StreamExt;
use parley_platform::backoff::Backoff;
use parley_platform::events::{AiJob, CarriedContext};
use parley_platform::grpc::ClientChannel;
use parley_platform::message_status::MessageStatus;
use parley_platform::nats::Names;
use parley_platform::telemetry::{self, NatsHeaderReader};
use parley_platform::{Config, ErrorCode, ServiceError};
use parley_proto::chat::v1 as chat_pb;
use parley_proto::chat::v1::chat_service_client::ChatServiceClient;
use parley_proto::quota::v1::quota_service_client::QuotaServiceClient;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::ProviderHandle;
use crate::accounting::Consumed;
use crate::cache::{CachedReply, ResponseCache};
use crate::chain::{Answer, DeltaSink, Failure};
use crate::provider::Completion;

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
    pub(crate) nats: async_nats::Client,
    pub(crate) jetstream: jetstream::Context,
    pub(crate) names: Names,
    pub(crate) chat: ChatServiceClient<ClientChannel>,
    pub(crate) quota: QuotaServiceClient<ClientChannel>,
    pub(crate) providers: Arc<BTreeMap<String, ProviderHandle>>,
    pub(crate) events: Arc<tokio::sync::OnceCell<jetstream::stream::Stream>>,
    pub(crate) cache: Arc<ResponseCache>,
    /// Redis, when reachable at start: reservations are raised there first (quota's own script).
    pub(crate) redis: Option<redis::aio::ConnectionManager>,
    pub(crate) reserver: Arc<parley_quota::reserve::Reserver>,
    /// The replies being generated here, which clients may stop.
    pub(crate) stops: Arc<crate::stops::Stops>,
    /// Where usage events go to be published (together, when they come together).
    pub(crate) usage: crate::usage::UsagePublisher,
}

/// How a reply was had.
pub(crate) enum Generated {
    /// From the model.
    Fresh(Answer),
    /// From the response cache, and how (`hit`, `coalesced`, `fail_open`).
    Cached(CachedReply, &'static str),
    Failed(Failure),
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
        let cache = Arc::new(ResponseCache::new(&config.agent.cache, redis.clone(), &config.redis.key_prefix));
        let reserver = Arc::new(parley_quota::reserve::Reserver::new(config.clone()));
        let usage =
            crate::usage::UsagePublisher::start(jetstream.clone(), names.usage_subject(), config.agent.usage_batch);
        Self {
            usage,
            redis,
            reserver,
            config,
            nats,
            jetstream,
            names,
            chat,
            quota,
            providers,
            events: Arc::new(tokio::sync::OnceCell::new()),
            cache,
            stops: Arc::default(),
        }
    }

    /// Pulls and runs jobs until `shutdown`. Then it pulls no more, hands back (naks) what it pulled and
    /// has not started, lets the jobs in flight finish for up to `agent.drain_secs`, hands back those
    /// still running after that, and returns once every job task has ended.
    pub async fn run(self, shutdown: CancellationToken) {
        let concurrency = self.config.agent.concurrency;
        let permits = Arc::new(Semaphore::new(concurrency));
        let mut tasks = JoinSet::new();
        // Cancelled when the drain's time is up: the jobs still running are handed back.
        let hand_back = CancellationToken::new();
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        // Followed until every job has ended (the drain included), when the task is aborted below.
        let stops = self.stops.clone().follow(self.nats.clone(), self.names.all_stops(), CancellationToken::new());
        let stops = tokio::spawn(stops);
        'connect: while !shutdown.is_cancelled() {
            let messages = match self.subscribe(concurrency).await {
                Ok(messages) => messages,
                Err(error) => {
                    tracing::warn!(%error, "job consumer not ready; retrying");
                    if !backoff.wait(&shutdown).await {
                        break;
                    }
                    continue;
                }
            };
            backoff.reset();
            tokio::pin!(messages);
            loop {
                let permit = tokio::select! {
                    _ = shutdown.cancelled() => {
                        hand_back_pulled(&mut messages).await;
                        break 'connect;
                    }
                    permit = permits.clone().acquire_owned() => match permit {
                        Ok(permit) => permit,
                        Err(_) => break 'connect,
                    },
                };
                let next = tokio::select! {
                    _ = shutdown.cancelled() => {
                        hand_back_pulled(&mut messages).await;
                        break 'connect;
                    }
                    next = messages.next() => next,
                };
                match next {
                    Some(Ok(message)) => {
                        let agent = self.clone();
                        let hand_back = hand_back.clone();
                        tasks.spawn(async move {
                            agent.handle(message, hand_back).await;
                            drop(permit);
                        });
                    }
                    Some(Err(error)) => tracing::warn!(%error, "pulling jobs failed"),
                    None => continue 'connect,
                }
                while tasks.try_join_next().is_some() {}
            }
        }
        let drain = Duration::from_secs(self.config.agent.drain_secs);
        if !tasks.is_empty() {
            tracing::info!(jobs = tasks.len(), ?drain, "finishing the jobs in flight before stopping");
        }
        let finished = tokio::time::timeout(drain, async { while tasks.join_next().await.is_some() {} }).await;
        if finished.is_err() {
            tracing::warn!(jobs = tasks.len(), "the drain's time is up; handing the jobs still running back");
            hand_back.cancel();
            while tasks.join_next().await.is_some() {}
        }
        stops.abort();
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

    /// Runs one job, keeping it alive with progress acks, and acks or naks it by the outcome; hands it
    /// back unfinished (nak) when `hand_back` is cancelled.
    async fn handle(&self, message: jetstream::Message, hand_back: CancellationToken) {
        let mut job: AiJob = match serde_json::from_slice(&message.payload) {
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
        // Taken out, so that nothing the job is passed to (the dead-letter stream) keeps its text.
        let carried = job.context.take();
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
            let work = self.run_job(&job, delivered, carried);
            tokio::pin!(work);
            // The first progress ack is one period away. (Not `interval()` and a first `tick().await`:
            // a timer due now still waits for the timer wheel's next millisecond, on every job.)
            let every = Duration::from_secs(self.config.nats.job_ack_wait_secs).div_f64(3.0);
            let mut keepalive = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            let outcome = loop {
                tokio::select! {
                    outcome = &mut work => break Some(outcome),
                    _ = keepalive.tick() => {
                        if let Err(error) = message.ack_with(AckKind::Progress).await {
                            tracing::warn!(%error, "progress ack failed");
                        }
                    }
                    _ = hand_back.cancelled() => break None,
                }
            };
            let (ack, label) = match outcome {
                Some(Outcome::Done) => (AckKind::Ack, "done"),
                Some(Outcome::Retry(delay)) => (AckKind::Nak(Some(delay)), "retry"),
                None => (AckKind::Nak(None), "handed_back"),
            };
            metrics::counter!(crate::metrics::JOBS, "outcome" => label).increment(1);
            if let Err(error) = message.ack_with(ack).await {
                tracing::warn!(%error, outcome = label, "acknowledging the job failed; it will be redelivered");
            }
        }
        .instrument(span)
        .await;
    }

    async fn run_job(&self, job: &AiJob, delivered: i64, carried: Option<CarriedContext>) -> Outcome {
        let retry = Outcome::Retry(retry_delay(delivered));
        let context = match self.context(job, delivered, carried).await {
            Ok(context) => context,
            Err(outcome) => return outcome,
        };
        let status = context.assistant_message.as_ref().and_then(MessageStatus::of);
        match status {
            Some(MessageStatus::Completed) => {
                tracing::info!("reply already stored (redelivered job); finishing its accounting");
                let message = context.assistant_message.unwrap_or_default();
                let usage = message.usage.unwrap_or_default();
                let completion = Completion {
                    content: message.content,
                    input_tokens: usage.input_tokens,
                    output_tokens: usage.output_tokens,
                    time_to_first_token: None,
                    finish_reason: None,
                    tool_calls: Vec::new(),
                    stopped: false,
                };
                let answer = Answer {
                    completion,
                    provider: "unknown".to_owned(),
                    provider_model: String::new(),
                    cache_hit: false,
                    elapsed: Duration::ZERO,
                };
                return self.account(job, &context.model, &answer).await.map_or(retry, |()| Outcome::Done);
            }
            Some(MessageStatus::Failed) => return Outcome::Done,
            Some(MessageStatus::Pending | MessageStatus::Streaming) | None => {}
        }
        let Some(model) = self.config.models.get(&context.model) else {
            let detail = format!("model {:?} is not configured", context.model);
            return self
                .fail(job, "invalid_request", &detail, None, Consumed::default())
                .await
                .map_or(retry, |()| Outcome::Done);
        };
        let prompt = self.assemble_prompt(job, &context, &context.model, model).await;
        let answering_model = self.route(&context.model, model, &prompt);
        if !self.reserve_for(job, model, &prompt, None).await {
            let detail = "the token budget does not cover this prompt and the longest reply";
            return self
                .fail(job, ErrorCode::QuotaExceeded.as_str(), detail, None, Consumed::default())
                .await
                .map_or(retry, |()| Outcome::Done);
        }
        // From here to the reply's end, whatever provider or retry is on, a client may stop it.
        let _running = self.stops.run(job.message_id);
        match self.generate(job, delivered, &context.model, &answering_model, &prompt, DeltaSink::Subject).await {
            Generated::Fresh(mut answer) => {
                if answer.completion.stopped {
                    // Charged like any reply: the prompt as this agent counts it.
                    answer.completion.input_tokens = self.prompt_tokens(model, &prompt);
                }
                self.finish_fresh(job, &context, &answering_model, &answer, retry).await
            }
            Generated::Cached(reply, how) => {
                let text = reply.content.clone();
                let prompt_tokens = self.prompt_tokens(model, &prompt);
                match self.answer_from_cache(job, delivered, &answering_model, reply, how, prompt_tokens).await {
                    Ok(()) => {
                        self.title_first_exchange(job, &context, &text).await;
                        Outcome::Done
                    }
                    Err(_) => retry,
                }
            }
            // Clients have already seen part of a reply: another attempt would contradict it, so the
            // message ends failed, keeping what was generated.
            Generated::Failed(Failure { error, streamed }) if !streamed.is_empty() => {
                tracing::warn!(%error, "the model failed mid-reply");
                let detail = format!("the model stopped mid-reply: {error}");
                let consumed = Consumed::partial(self.prompt_tokens(model, &prompt), &streamed);
                self.fail(job, ErrorCode::UpstreamUnavailable.as_str(), &detail, Some(streamed), consumed)
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
                self.fail(job, ErrorCode::UpstreamUnavailable.as_str(), &detail, None, Consumed::default())
                    .await
                    .map_or(retry, |()| Outcome::Done)
            }
        }
    }

    /// The job's context: on its first run the one it carries, if any (chat publishes a job with its
    /// context only before anything else can have published it, so its reply is still pending), else
    /// chat's, which also tells whether a redelivered job's reply is stored already. `Err`: the job
    /// ends with this outcome.
    async fn context(
        &self,
        job: &AiJob,
        delivered: i64,
        carried: Option<CarriedContext>,
    ) -> Result<chat_pb::JobContext, Outcome> {
        if let Some(carried) = carried.filter(|_| delivered == 1) {
            metrics::counter!(crate::metrics::JOB_CONTEXTS, "source" => "carried").increment(1);
            return Ok(carried_context(job, carried));
        }
        metrics::counter!(crate::metrics::JOB_CONTEXTS, "source" => "asked").increment(1);
        let request = chat_pb::GetJobContextRequest { message_id: job.message_id.to_string(), history_limit: 0 };
        match self.chat.clone().get_job_context(request).await {
            Ok(response) => Ok(response.into_inner()),
            Err(status) => {
                let error = ServiceError::from(status);
                if error.code == ErrorCode::NotFound {
                    tracing::info!("the message is gone (conversation deleted); dropping the job");
                    return Err(Outcome::Done);
                }
                tracing::warn!(%error, "could not load the job's context");
                Err(Outcome::Retry(retry_delay(delivered)))
            }
        }
    }

    /// Stores a reply the model wrote, then titles the conversation after its first exchange.
    async fn finish_fresh(
        &self,
        job: &AiJob,
        context: &chat_pb::JobContext,
        answering_model: &str,
        answer: &Answer,
        retry: Outcome,
    ) -> Outcome {
        match self.store(job, answering_model, answer).await {
            Ok(()) => {
                self.title_first_exchange(job, context, &answer.completion.content).await;
                Outcome::Done
            }
            Err(error) => {
                tracing::warn!(%error, "could not store the reply; retrying the job");
                retry
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
        let cache_key = crate::cache::key(requested_model, prompt, self.longest_reply(job), &job.sampling);
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
                // A reply its client stopped is theirs alone: requests waiting on it call for their own.
                let whole = result.as_ref().ok().filter(|answer| !answer.completion.stopped);
                let reply = whole.map(|answer| CachedReply::from(&answer.completion));
                (result, reply)
            };
            match self.cache.coalesce(&cache_key, call).await {
                Ok(result) => {
                    metrics::counter!(crate::metrics::LLM_CACHE_REQUESTS, "outcome" => "miss").increment(1);
                    result
                }
                Err(Some(shared)) => return Generated::Cached(shared, "coalesced"),
                Err(None) => self.call_chain(job, delivered, answering_model, prompt, sink).await,
            }
        } else {
            metrics::counter!(crate::metrics::LLM_CACHE_REQUESTS, "outcome" => "not_cacheable").increment(1);
            self.call_chain(job, delivered, answering_model, prompt, sink).await
        };
        match outcome {
            Ok(answer) => {
                if cacheable && job.cache.write && !answer.completion.stopped {
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
}

/// A carried context as chat's `GetJobContext` would answer it for a reply still pending (which it
/// leaves out: no reply means pending).
fn carried_context(job: &AiJob, carried: CarriedContext) -> chat_pb::JobContext {
    let history = carried
        .history
        .into_iter()
        .map(|message| chat_pb::Message {
            id: message.id.to_string(),
            role: message.role,
            content: message.content,
            ..Default::default()
        })
        .collect();
    chat_pb::JobContext {
        assistant_message: None,
        user_id: job.user_id.to_string(),
        model: job.model.clone(),
        system_prompt: carried.system_prompt,
        history,
        summary: carried.summary,
        conversation_id: job.conversation_id.to_string(),
        untitled: carried.untitled,
    }
}

/// Hands back (naks) the jobs the pull stream already holds and no job task has taken, so that another
/// agent gets them at once rather than after their ack wait.
async fn hand_back_pulled(messages: &mut std::pin::Pin<&mut jetstream::consumer::pull::Stream>) {
    use futures::FutureExt;
    while let Some(Some(Ok(message))) = messages.next().now_or_never() {
        if let Err(error) = message.ack_with(AckKind::Nak(None)).await {
            tracing::debug!(%error, "handing back a pulled job failed; it is redelivered after its ack wait");
        }
    }
}

/// Exponential redelivery delay: 1 s, 2 s, 4 s ... capped at 30 s.
fn retry_delay(delivered: i64) -> Duration {
    let attempt = u32::try_from(delivered.max(1)).unwrap_or(u32::MAX);
    parley_platform::backoff::exponential(Duration::from_secs(1), Duration::from_secs(30), attempt)
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
