//! Calling a model: routing to a cheaper model, the chain of providers in order with retries, breakers
//! and key pools, and each streamed piece of the reply sent where it goes (the message's subject, or
//! the caller of a stateless completion).

use std::future::Future;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use parley_platform::events::{AiJob, MessageEvent};
use parley_platform::finish::FinishReason;
use parley_platform::tokens;
use tokio::sync::mpsc;
use tracing::Instrument;
use uuid::Uuid;

use crate::ProviderHandle;
use crate::provider::{Completion, Delta, ProviderError, Sampling};
use crate::resilience::{KeyOutcome, backoff};
use crate::worker::Agent;
use parley_proto::agent::v1::{CompleteEvent, ToolCallDelta, complete_event};

/// One call to one provider.
pub(crate) struct ProviderCall<'a> {
    provider: &'a ProviderHandle,
    key: Option<&'a str>,
    model: &'a str,
    prompt: &'a [crate::provider::PromptMessage],
    sampling: Sampling<'a>,
}

/// One call to a provider that [`Agent::with_retries`] makes, and makes again while it fails in a way
/// worth retrying.
pub(crate) trait Attempt: Send {
    type Output: Send;

    /// What the call does, by OpenTelemetry's `gen_ai.operation.name`.
    const OPERATION: Operation;

    /// Makes the call with `key`. Returns its result and what clients already saw of it (a retry may
    /// not contradict that).
    fn run<'k>(
        &'k mut self,
        key: Option<&'k str>,
    ) -> impl Future<Output = (Result<Self::Output, ProviderError>, String)> + Send + 'k;

    /// The input and output tokens a successful call used.
    fn tokens(output: &Self::Output) -> (i64, i64);

    fn time_to_first_token(_output: &Self::Output) -> Option<Duration> {
        None
    }
}

/// A reply: one streaming chat call, its pieces sent where they go.
struct ChatAttempt<'a> {
    agent: &'a Agent,
    provider: &'a ProviderHandle,
    model: &'a str,
    prompt: &'a [crate::provider::PromptMessage],
    sampling: Sampling<'a>,
    job: &'a AiJob,
    delta_index: &'a mut u64,
    sink: DeltaSink<'a>,
}

/// The kinds of provider call.
#[derive(Clone, Copy)]
pub(crate) enum Operation {
    Chat,
    Embeddings,
}

/// A provider call's span (OpenTelemetry's `gen_ai.*` conventions), with empty usage fields to record.
fn provider_span(operation: Operation, provider: &str, model: &str, attempt: u32) -> tracing::Span {
    // A span's name is fixed where it is written.
    macro_rules! span {
        ($name:literal, $operation:literal) => {
            tracing::info_span!(
                $name,
                otel.kind = "client",
                gen_ai.operation.name = $operation,
                gen_ai.system = %provider,
                gen_ai.request.model = %model,
                gen_ai.usage.input_tokens = tracing::field::Empty,
                gen_ai.usage.output_tokens = tracing::field::Empty,
                attempt,
            )
        };
    }
    match operation {
        Operation::Chat => span!("gen_ai.chat", "chat"),
        Operation::Embeddings => span!("gen_ai.embeddings", "embeddings"),
    }
}

impl Attempt for ChatAttempt<'_> {
    type Output = Completion;

    const OPERATION: Operation = Operation::Chat;

    fn run<'k>(
        &'k mut self,
        key: Option<&'k str>,
    ) -> impl Future<Output = (Result<Completion, ProviderError>, String)> + Send + 'k {
        let call = ProviderCall {
            provider: self.provider,
            key,
            model: self.model,
            prompt: self.prompt,
            sampling: self.sampling,
        };
        self.agent.call_streaming(call, self.job.message_id, self.delta_index, self.sink)
    }

    fn tokens(completion: &Completion) -> (i64, i64) {
        (completion.input_tokens, completion.output_tokens)
    }

    fn time_to_first_token(completion: &Completion) -> Option<Duration> {
        completion.time_to_first_token
    }
}

/// A failed model call, with the text that had already been streamed to clients.
pub(crate) struct Failure {
    pub(crate) error: ProviderError,
    pub(crate) streamed: String,
}

/// Where a reply's pieces go as they arrive.
#[derive(Clone, Copy)]
pub(crate) enum DeltaSink<'a> {
    /// The message's NATS subject: a job's reply, which any gateway may be streaming.
    Subject,
    /// Straight back to the caller of a stateless completion.
    Caller(&'a mpsc::UnboundedSender<Result<parley_proto::agent::v1::CompleteEvent, tonic::Status>>),
}

/// A delta event carries the text already waiting up to about this many bytes.
const COALESCED_DELTA_BYTES: usize = 4096;

/// A piece of a reply on its way from the provider call to where it goes.
enum Piece {
    Text(String),
    Tool(ToolCallDelta),
    /// OpenAI's `logprobs.content` entries, as JSON.
    Logprobs(String),
}

/// A successful model call, with where it was made.
pub(crate) struct Answer {
    pub(crate) completion: Completion,
    pub(crate) provider: String,
    /// The model at the provider (the chain entry's), which prices the call; empty for a cached reply.
    pub(crate) provider_model: String,
    pub(crate) elapsed: Duration,
    pub(crate) cache_hit: bool,
}

impl Agent {
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
            metrics::counter!(crate::metrics::LLM_ROUTED, "from" => requested.to_owned(), "to" => router.model.clone())
                .increment(1);
            tracing::debug!(from = requested, to = %router.model, "simple request routed to the cheaper model");
            return router.model.clone();
        }
        requested.to_owned()
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
        let prompt_tokens = self.config.models.get(model_name).map_or(0, |model| self.prompt_tokens(model, prompt));
        let mut delta_index = self.start_deltas(job, delivered, prompt_tokens).await;
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

    /// Calls one provider for a reply, retrying as [`Agent::with_retries`] does.
    pub(crate) async fn call_with_retries(
        &self,
        provider: &ProviderHandle,
        model: &str,
        prompt: &[crate::provider::PromptMessage],
        job: &AiJob,
        delta_index: &mut u64,
        sink: DeltaSink<'_>,
    ) -> Result<Answer, Failure> {
        let sampling = Sampling { max_tokens: self.longest_reply(job), params: &job.sampling };
        let attempt = ChatAttempt { agent: self, provider, model, prompt, sampling, job, delta_index, sink };
        let (completion, elapsed) = self.with_retries(provider, model, attempt).await?;
        let (provider, provider_model) = (provider.client.name.clone(), model.to_owned());
        Ok(Answer { completion, provider, provider_model, elapsed, cache_hit: false })
    }

    /// Runs `attempt` against one provider, retrying retryable failures with jittered exponential
    /// backoff (or the provider's `Retry-After`), moving to the next key on 401, 403 and 429, and
    /// skipping the provider while its circuit is open. Returns the output and how long its call took.
    pub(crate) async fn with_retries<A: Attempt>(
        &self,
        provider: &ProviderHandle,
        model: &str,
        mut attempt: A,
    ) -> Result<(A::Output, Duration), Failure> {
        let retry = &self.config.agent.retry;
        let started = Instant::now();
        let name = provider.client.name.clone();
        let mut attempts = 0;
        loop {
            if !provider.breaker.allow() {
                metrics::counter!(crate::metrics::LLM_REQUESTS, "provider" => name.clone(), "model" => model.to_owned(), "outcome" => "circuit_open").increment(1);
                let error = ProviderError::Status {
                    status: 503,
                    message: format!("circuit open for {name}"),
                    retry_after: None,
                };
                return Err(Failure { error, streamed: String::new() });
            }
            attempts += 1;
            let key = provider.keys.pick();
            let span = provider_span(A::OPERATION, &name, model, attempts);
            let call_started = Instant::now();
            let (result, streamed) =
                attempt.run(key.as_ref().map(|(_, secret)| secret.as_str())).instrument(span.clone()).await;
            let elapsed = call_started.elapsed();
            let labels = [("provider", name.clone()), ("model", model.to_owned())];
            metrics::histogram!(crate::metrics::LLM_REQUEST_DURATION, &labels).record(elapsed.as_secs_f64());
            let error = match result {
                Ok(output) => {
                    provider.breaker.record_success();
                    if let Some((index, _)) = &key {
                        provider.keys.report(*index, KeyOutcome::Worked);
                    }
                    let (input_tokens, output_tokens) = A::tokens(&output);
                    span.record("gen_ai.usage.input_tokens", input_tokens);
                    span.record("gen_ai.usage.output_tokens", output_tokens);
                    metrics::counter!(crate::metrics::LLM_REQUESTS, "provider" => name.clone(), "model" => model.to_owned(), "outcome" => "ok").increment(1);
                    if let Some(ttft) = A::time_to_first_token(&output) {
                        metrics::histogram!(crate::metrics::LLM_TIME_TO_FIRST_TOKEN, &labels)
                            .record(ttft.as_secs_f64());
                    }
                    metrics::counter!(crate::metrics::LLM_TOKENS, "provider" => name.clone(), "model" => model.to_owned(), "direction" => "input").increment(input_tokens.max(0) as u64);
                    metrics::counter!(crate::metrics::LLM_TOKENS, "provider" => name.clone(), "model" => model.to_owned(), "direction" => "output").increment(output_tokens.max(0) as u64);
                    return Ok((output, elapsed));
                }
                Err(error) => error,
            };
            metrics::counter!(crate::metrics::LLM_REQUESTS, "provider" => name.clone(), "model" => model.to_owned(), "outcome" => "error").increment(1);
            tracing::warn!(%error, provider = %name, %model, attempt = attempts, "provider call failed");
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
            let delay = if another_key { Duration::ZERO } else { backoff(retry, attempts, error.retry_after()) };
            let out_of_time = started.elapsed() + delay > Duration::from_millis(retry.max_elapsed_ms);
            if attempts >= retry.max_attempts || out_of_time {
                return Err(Failure { error, streamed });
            }
            metrics::counter!(crate::metrics::LLM_RETRIES, "provider" => name.clone()).increment(1);
            tokio::time::sleep(delay).await;
        }
    }

    /// Where this attempt's deltas start. A job's first delivery starts at 0 without asking JetStream.
    /// A redelivered job whose earlier attempt had published deltas (its agent died or was stopped
    /// mid-reply) starts the reply again: it publishes a reset after the last of them, which tells
    /// clients to drop the text they hold, and numbers its own deltas after the reset. Indices never
    /// repeat, so a client resuming by `Last-Event-ID` sees each event once, and the text it assembles
    /// equals the stored reply.
    ///
    /// The attempt that streamed and died consumed tokens nobody charged: it is charged here, once (by
    /// an event id made from the message and its last delta), the prompt (`prompt_tokens`) and the text
    /// it streamed, read back from the events stream.
    pub(crate) async fn start_deltas(&self, job: &AiJob, delivered: i64, prompt_tokens: i64) -> u64 {
        let message_id = job.message_id;
        if delivered <= 1 {
            return 0;
        }
        let Some(events) = self.events.get() else {
            return 0;
        };
        let subject = self.names.message_events_subject(message_id);
        let last = match events.get_last_raw_message_by_subject(&subject).await {
            Ok(last) => serde_json::from_slice::<MessageEvent>(&last.payload).ok(),
            Err(_) => None,
        };
        match last {
            Some(MessageEvent::Delta { index, .. }) => {
                tracing::info!(after = index, "an earlier attempt streamed part of this reply; starting it again");
                match abandoned_text(events, &subject).await {
                    Some(streamed) => {
                        let consumed = crate::accounting::Consumed::partial(prompt_tokens, &streamed);
                        if let Err(error) = self.report_abandoned(job, index, consumed).await {
                            tracing::warn!(%error, "could not report the abandoned attempt; it is not charged");
                        }
                    }
                    None => tracing::warn!("could not read back the abandoned attempt's text; it is not charged"),
                }
                self.publish_event(&subject, &MessageEvent::Reset { message_id, index: index + 1 }).await;
                index + 2
            }
            // An earlier attempt reset the reply and died before its first delta: nothing to void.
            Some(MessageEvent::Reset { index, .. }) => index + 1,
            _ => 0,
        }
    }

    /// One streaming call; each delta is published on the message's subject as it arrives.
    pub(crate) async fn call_streaming(
        &self,
        call: ProviderCall<'_>,
        message_id: Uuid,
        delta_index: &mut u64,
        sink: DeltaSink<'_>,
    ) -> (Result<Completion, ProviderError>, String) {
        let ProviderCall { provider, key, model, prompt, sampling } = call;
        let (deltas, mut received) = mpsc::unbounded_channel::<Piece>();
        let call = async move {
            let mut on_delta = move |delta: Delta<'_>| {
                let piece = match delta {
                    Delta::Text(text) => Piece::Text(text.to_owned()),
                    Delta::ToolCall { index, id, name, arguments } => Piece::Tool(ToolCallDelta {
                        index,
                        id: id.to_owned(),
                        name: name.to_owned(),
                        arguments: arguments.to_owned(),
                    }),
                    Delta::Logprobs(entries) => Piece::Logprobs(serde_json::Value::from(entries.to_vec()).to_string()),
                };
                let _receiver_gone = deltas.send(piece);
            };
            provider.client.stream_chat(key, model, prompt, sampling, &mut on_delta).await
        };
        let subject = self.names.message_events_subject(message_id);
        // A conversation's reply can be stopped by its client (its job registered it); a completion
        // ends when its caller hangs up.
        let stop = matches!(sink, DeltaSink::Subject).then(|| self.stops.token(message_id)).flatten();
        // What clients saw: no retry may contradict it, and a failure is charged for it.
        let mut streamed = String::new();
        let forward = async {
            // A piece taken while merging text that is not text: it goes out next, in its turn.
            let mut held = None;
            loop {
                let piece = match held.take() {
                    Some(piece) => piece,
                    None => match received.recv().await {
                        Some(piece) => piece,
                        None => break,
                    },
                };
                match (piece, sink) {
                    (Piece::Text(mut text), _) => {
                        // Text the provider has already sent behind this piece goes out in the same
                        // event: one message for NATS, the events stream, the gRPC call and every
                        // stream to carry instead of one per token, and not a moment later than it
                        // would have. A fast model's reply comes in a few events; a slow one's as
                        // it is written.
                        while text.len() < COALESCED_DELTA_BYTES
                            && let Ok(piece) = received.try_recv()
                        {
                            match piece {
                                Piece::Text(more) => text.push_str(&more),
                                other => {
                                    held = Some(other);
                                    break;
                                }
                            }
                        }
                        streamed.push_str(&text);
                        match sink {
                            DeltaSink::Subject => {
                                let event = MessageEvent::Delta { message_id, index: *delta_index, text };
                                self.publish_event(&subject, &event).await;
                            }
                            // A caller that hung up cancels nothing: the reply is finished and charged.
                            DeltaSink::Caller(caller) => {
                                let _caller_gone = caller.send(Ok(crate::completions::delta(text)));
                            }
                        }
                    }
                    (Piece::Tool(tool), DeltaSink::Caller(caller)) => {
                        streamed.push_str(&tool.name);
                        streamed.push_str(&tool.arguments);
                        let event = CompleteEvent { event: Some(complete_event::Event::ToolCall(tool)) };
                        let _caller_gone = caller.send(Ok(event));
                    }
                    (Piece::Logprobs(entries), DeltaSink::Caller(caller)) => {
                        let event = CompleteEvent { event: Some(complete_event::Event::Logprobs(entries)) };
                        let _caller_gone = caller.send(Ok(event));
                        continue;
                    }
                    // A conversation offers no tools and asks for no log probabilities.
                    (Piece::Tool(_) | Piece::Logprobs(_), DeltaSink::Subject) => continue,
                }
                *delta_index += 1;
            }
        };
        let stopped = async {
            match &stop {
                Some(stop) => stop.cancelled().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            (result, ()) = async { tokio::join!(call, forward) } => (result, streamed),
            () = stopped => {
                // The provider's call ends here (its connection is dropped); what was streamed is the
                // reply. The provider reported no usage for it: the output is estimated here, and
                // the job counts the prompt as it counts any.
                let completion = Completion {
                    content: streamed.clone(),
                    input_tokens: 0,
                    output_tokens: i64::from(tokens::estimate(&streamed)),
                    time_to_first_token: None,
                    finish_reason: Some(FinishReason::Stop),
                    tool_calls: Vec::new(),
                    stopped: true,
                };
                (Ok(completion), streamed)
            }
        }
    }

    pub(crate) async fn publish_event(&self, subject: &str, event: &MessageEvent) {
        let Ok(payload) = serde_json::to_vec(event) else {
            return;
        };
        if let Err(error) = self.nats.publish(subject.to_owned(), payload.into()).await {
            tracing::debug!(%error, "could not publish a message event");
        }
    }
}

/// The text a message's latest attempt streamed (its deltas after the last reset), read back from the
/// events stream; `None` when it cannot be read in a few seconds.
async fn abandoned_text(events: &jetstream::stream::Stream, subject: &str) -> Option<String> {
    use futures::StreamExt;
    let config = jetstream::consumer::pull::OrderedConfig {
        filter_subject: subject.to_owned(),
        deliver_policy: jetstream::consumer::DeliverPolicy::All,
        ..Default::default()
    };
    let mut consumer = events.create_consumer(config).await.ok()?;
    let mut pending = consumer.info().await.ok()?.num_pending;
    let mut messages = consumer.messages().await.ok()?;
    let mut text = String::new();
    while pending > 0 {
        let message = tokio::time::timeout(Duration::from_secs(2), messages.next()).await.ok()??.ok()?;
        pending -= 1;
        match serde_json::from_slice::<MessageEvent>(&message.payload) {
            Ok(MessageEvent::Delta { text: delta, .. }) => text.push_str(&delta),
            Ok(MessageEvent::Reset { .. }) => text.clear(),
            _ => {}
        }
    }
    Some(text)
}
