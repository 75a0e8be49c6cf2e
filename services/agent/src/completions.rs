//! Stateless completions for the OpenAI-compatible API (`parley.agent.v1.AgentService/Complete`).
//!
//! The gateway calls an agent directly and the reply streams back over the call as the provider
//! generates it: no conversation is stored, no job is queued, no event goes through NATS on the way.
//! The same provider chain, retries, breakers, key pools, routing and response cache answer it as a
//! job. The gateway's budget reservation is raised to the real prompt before the provider is called
//! (a refusal is `quota_exceeded` before anything streams), and once the reply is whole its usage event
//! is published (idempotent by the completion id; quota settles the tokens from it) in a task the agent
//! waits for at shutdown, so the caller does not wait for the accounting.

use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use parley_platform::ServiceError;
use parley_platform::events::{AiJob, CacheDirective};
use parley_platform::sampling::Sampling;
use parley_proto::agent::v1 as pb;
use parley_proto::agent::v1::agent_service_server::AgentService;
use parley_proto::chat::v1 as chat_pb;
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status};
use tracing::Instrument;
use uuid::Uuid;

use crate::accounting::Consumed;
use crate::cache::CachedReply;
use crate::chain::{Answer, DeltaSink, Failure};
use crate::provider::{Completion, PromptMessage, ToolCall};
use crate::worker::{Agent, Generated};

/// What one call streams back.
type Events = mpsc::UnboundedSender<Result<pb::CompleteEvent, Status>>;

pub struct Completions {
    agent: Agent,
    /// The completions still generating or being accounted for; waited for at shutdown.
    tasks: TaskTracker,
}

impl Completions {
    pub fn new(agent: Agent) -> Self {
        Self { agent, tasks: TaskTracker::new() }
    }

    pub fn tasks(&self) -> TaskTracker {
        self.tasks.clone()
    }

    /// The request as a job that is never queued: what the provider chain, the cache and the
    /// accounting take. Refuses what the chat service would refuse for a stored completion.
    fn job_for(&self, request: &pb::CompleteRequest) -> Result<(AiJob, Vec<PromptMessage>), ServiceError> {
        let config = &self.agent.config;
        let uuid = |field: &str, text: &str| {
            Uuid::parse_str(text).map_err(|_| ServiceError::invalid_field(field, "must be a UUID"))
        };
        if !config.serves_chat(&request.model) {
            return Err(ServiceError::invalid_field(
                "model",
                format!("{:?} is not a configured chat model", request.model),
            ));
        }
        if request.messages.is_empty() {
            return Err(ServiceError::invalid_field("messages", "must not be empty"));
        }
        let mut prompt = Vec::with_capacity(request.messages.len());
        let mut total_chars = 0;
        for (index, message) in request.messages.iter().enumerate() {
            let role = parley_platform::prompt::role_with_tools(index, &message.role)?;
            if role == "tool" && message.tool_call_id.is_empty() {
                return Err(ServiceError::invalid_field(format!("messages[{index}].tool_call_id"), "is required"));
            }
            let tool_calls: Vec<ToolCall> = message
                .tool_calls
                .iter()
                .map(|call| ToolCall {
                    id: call.id.clone(),
                    name: call.name.clone(),
                    arguments: call.arguments.clone(),
                })
                .collect();
            total_chars += message.content.chars().count()
                + tool_calls.iter().map(|call| call.arguments.chars().count()).sum::<usize>();
            let parts = if message.parts.is_empty() {
                Vec::new()
            } else {
                match serde_json::from_str::<serde_json::Value>(&message.parts) {
                    Ok(serde_json::Value::Array(parts)) => parts,
                    _ => {
                        return Err(ServiceError::invalid_field(
                            format!("messages[{index}].content"),
                            "unreadable parts",
                        ));
                    }
                }
            };
            prompt.push(PromptMessage {
                role: role.to_owned(),
                content: message.content.clone(),
                parts,
                tool_calls,
                tool_call_id: (role == "tool").then(|| message.tool_call_id.clone()),
            });
        }
        if total_chars > config.chat.max_message_chars {
            let limit = config.chat.max_message_chars;
            return Err(ServiceError::invalid_field("messages", format!("must total at most {limit} characters")));
        }
        if prompt.iter().any(|message| message.images() > 0) && !config.takes_images(&request.model) {
            return Err(ServiceError::invalid_field(
                "messages",
                format!("the model {:?} does not take images", request.model),
            ));
        }
        let options = request.options.clone().unwrap_or_default();
        let sampling = Sampling::from_options(&options)?;
        parley_platform::sampling::check_model(config, &request.model, &sampling)?;
        let completion_id = uuid("completion_id", &request.completion_id)?;
        let job = AiJob {
            job_id: completion_id,
            message_id: completion_id,
            // A stateless completion belongs to no conversation.
            conversation_id: Uuid::nil(),
            user_id: uuid("user_id", &request.user_id)?,
            model: request.model.clone(),
            tier: request.tier.clone(),
            sampling,
            cache: CacheDirective { read: !options.skip_cache_read, write: !options.skip_cache_write },
            reservation_id: Some(uuid("reservation_id", &request.reservation_id)?),
            max_tokens: (request.max_tokens > 0).then_some(request.max_tokens),
            context: None,
        };
        Ok((job, prompt))
    }
}

impl Completions {
    /// An embeddings request as a job that is never queued: what the chain and the accounting take.
    fn embedding_job(&self, request: &pb::EmbedRequest) -> Result<AiJob, ServiceError> {
        let uuid = |field: &str, text: &str| {
            Uuid::parse_str(text).map_err(|_| ServiceError::invalid_field(field, "must be a UUID"))
        };
        if !self.agent.config.serves_embeddings(&request.model) {
            let message = format!("{:?} is not a configured embeddings model", request.model);
            return Err(ServiceError::invalid_field("model", message));
        }
        if request.inputs.is_empty() {
            return Err(ServiceError::invalid_field("input", "must not be empty"));
        }
        let id = uuid("embedding_id", &request.embedding_id)?;
        Ok(AiJob {
            job_id: id,
            message_id: id,
            conversation_id: Uuid::nil(),
            user_id: uuid("user_id", &request.user_id)?,
            model: request.model.clone(),
            tier: request.tier.clone(),
            sampling: Sampling::default(),
            cache: CacheDirective { read: false, write: false },
            reservation_id: Some(uuid("reservation_id", &request.reservation_id)?),
            max_tokens: None,
            context: None,
        })
    }
}

#[tonic::async_trait]
impl AgentService for Completions {
    async fn embed(&self, request: Request<pb::EmbedRequest>) -> Result<Response<pb::EmbedReply>, Status> {
        let request = request.into_inner();
        let job = self.embedding_job(&request)?;
        let options = crate::provider::EmbedOptions {
            dimensions: (request.dimensions > 0).then_some(request.dimensions),
            user: Some(request.user.as_str()).filter(|user| !user.is_empty()),
        };
        let embeddings = match self.agent.embed(&job, &request.inputs, options).await {
            Ok(embeddings) => embeddings,
            Err(error) => {
                tracing::warn!(%error, "the embeddings failed");
                // Nothing consumed: the reservation goes back at once.
                if let Err(error) = self.agent.report_failure(&job, Consumed::partial(0, "")).await {
                    tracing::warn!(%error, "could not report the failed embeddings; their reservation expires by itself");
                }
                let detail = format!("the model could not answer: {error}");
                let error = ServiceError::new(parley_platform::ErrorCode::UpstreamUnavailable, detail).retry_after(5);
                return Err(error.into());
            }
        };
        let input_tokens = embeddings.embedded.input_tokens;
        let completion = Completion {
            content: String::new(),
            input_tokens,
            output_tokens: 0,
            time_to_first_token: None,
            finish_reason: None,
            tool_calls: Vec::new(),
            stopped: false,
        };
        let answer = Answer {
            completion,
            provider: embeddings.provider,
            provider_model: embeddings.provider_model,
            elapsed: embeddings.elapsed,
            cache_hit: false,
        };
        let agent = self.agent.clone();
        let span =
            tracing::info_span!("agent.embeddings.accounting", service = "agent", embedding_id = %job.message_id);
        self.tasks.spawn(async move { agent.account_completion(&job, &job.model, &answer).await }.instrument(span));
        let embeddings = embeddings.embedded.vectors.into_iter().map(|values| pb::Embedding { values }).collect();
        Ok(Response::new(pb::EmbedReply { embeddings, input_tokens }))
    }

    type CompleteStream = Pin<Box<dyn Stream<Item = Result<pb::CompleteEvent, Status>> + Send>>;

    async fn complete(&self, request: Request<pb::CompleteRequest>) -> Result<Response<Self::CompleteStream>, Status> {
        let (job, prompt) = self.job_for(request.get_ref()).map_err(Status::from)?;
        let agent = self.agent.clone();
        let model = agent.config.models.get(&job.model).ok_or_else(|| Status::from(ServiceError::internal()))?;
        let answering_model = agent.route(&job.model, model, &prompt);
        if !agent.reserve_for(&job, model, &prompt, Some(request.get_ref().reserved_tokens)).await {
            let detail = "the token budget does not cover this prompt and the longest reply";
            return Err(ServiceError::new(parley_platform::ErrorCode::QuotaExceeded, detail).into());
        }
        let (events, mut received) = mpsc::unbounded_channel();
        let span = tracing::info_span!("agent.completion", service = "agent", completion_id = %job.message_id);
        self.tasks.spawn(async move { agent.complete(job, answering_model, prompt, events).await }.instrument(span));
        if request.get_ref().whole {
            // Everything at once when it is done: one write for the call instead of one per event.
            let whole = futures::stream::once(async move {
                let mut events = Vec::new();
                while let Some(event) = received.recv().await {
                    events.push(event);
                }
                futures::stream::iter(merge_deltas(events))
            });
            return Ok(Response::new(Box::pin(futures::StreamExt::flatten(whole))));
        }
        let stream = futures::stream::unfold(received, |mut received| async move {
            received.recv().await.map(|event| (event, received))
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

impl Agent {
    /// Generates one stateless completion into `events`, then charges and reports it.
    async fn complete(&self, job: AiJob, answering_model: String, prompt: Vec<PromptMessage>, events: Events) {
        let generated = self.generate(&job, 1, &job.model, &answering_model, &prompt, DeltaSink::Caller(&events)).await;
        let answer = match generated {
            Generated::Fresh(answer) => answer,
            Generated::Cached(reply, how) => {
                metrics::counter!(crate::metrics::LLM_CACHE_REQUESTS, "outcome" => how).increment(1);
                let _caller_gone = events.send(Ok(delta(reply.content.clone())));
                cached_answer(reply)
            }
            Generated::Failed(Failure { error, streamed }) => {
                tracing::warn!(%error, streamed = streamed.len(), "the completion failed");
                let detail = format!("the model could not answer: {error}");
                let error = ServiceError::new(parley_platform::ErrorCode::UpstreamUnavailable, detail).retry_after(5);
                let _caller_gone = events.send(Err(error.into()));
                // The caller's call ends here (a whole reply's events go when the channel closes).
                drop(events);
                // Charged what the model consumed before it broke off (nothing if it never started), the
                // rest of the reservation given back at once.
                let input_tokens =
                    self.config.models.get(&job.model).map_or(0, |model| self.prompt_tokens(model, &prompt));
                if let Err(error) = self.report_failure(&job, Consumed::partial(input_tokens, &streamed)).await {
                    tracing::warn!(%error, "could not report the failed completion; its reservation expires by itself");
                }
                return;
            }
        };
        let done = pb::CompleteDone {
            input_tokens: answer.completion.input_tokens,
            output_tokens: answer.completion.output_tokens,
            model: answering_model.clone(),
            finish_reason: answer
                .completion
                .finish_reason
                .as_ref()
                .map(|reason| reason.as_openai().to_owned())
                .unwrap_or_default(),
            tool_calls: answer
                .completion
                .tool_calls
                .iter()
                .map(|call| chat_pb::ToolCall {
                    id: call.id.clone(),
                    name: call.name.clone(),
                    arguments: call.arguments.clone(),
                })
                .collect(),
        };
        let _caller_gone = events.send(Ok(pb::CompleteEvent { event: Some(pb::complete_event::Event::Done(done)) }));
        drop(events);
        self.account_completion(&job, &answering_model, &answer).await;
    }

    /// Charges and reports a completion, retrying a few times: the caller has its reply already, so
    /// nothing is waiting, and a charge is worth a second try (both steps are idempotent).
    async fn account_completion(&self, job: &AiJob, model: &str, answer: &Answer) {
        // Waits of 1, 2, 4 and 8 s between five tries: about a quarter of a minute in all.
        let mut backoff = parley_platform::backoff::Backoff::new(Duration::from_secs(1), Duration::from_secs(8));
        for attempt in 1..=5 {
            match self.charge_and_report(job, model, answer).await {
                Ok(()) => return,
                Err(error) if attempt < 5 => {
                    tracing::warn!(%error, attempt, "could not account for a completion; retrying");
                    tokio::time::sleep(backoff.next_wait()).await;
                }
                Err(error) => tracing::warn!(%error, attempt, "could not account for a completion"),
            }
        }
        tracing::error!("a completion could not be accounted for; its reservation expires by itself");
        metrics::counter!(crate::metrics::UNACCOUNTED_COMPLETIONS).increment(1);
    }
}

/// `events` with each run of consecutive deltas as one delta.
fn merge_deltas(events: Vec<Result<pb::CompleteEvent, Status>>) -> Vec<Result<pb::CompleteEvent, Status>> {
    let mut merged: Vec<Result<pb::CompleteEvent, Status>> = Vec::with_capacity(events.len());
    for event in events {
        if let (Ok(pb::CompleteEvent { event: Some(pb::complete_event::Event::Delta(more)) }), Some(Ok(last))) =
            (&event, merged.last_mut())
            && let Some(pb::complete_event::Event::Delta(text)) = &mut last.event
        {
            text.push_str(more);
            continue;
        }
        merged.push(event);
    }
    merged
}

pub(crate) fn delta(text: String) -> pb::CompleteEvent {
    pb::CompleteEvent { event: Some(pb::complete_event::Event::Delta(text)) }
}

/// A cached reply as an answer: it cost no model tokens, so it costs the user none of their budget.
fn cached_answer(reply: CachedReply) -> Answer {
    let completion = Completion {
        content: reply.content,
        input_tokens: reply.input_tokens,
        output_tokens: reply.output_tokens,
        time_to_first_token: None,
        finish_reason: None,
        tool_calls: Vec::new(),
        stopped: false,
    };
    let provider = "cache".to_owned();
    Answer { completion, provider, provider_model: String::new(), elapsed: Duration::ZERO, cache_hit: true }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(event: pb::complete_event::Event) -> Result<pb::CompleteEvent, Status> {
        Ok(pb::CompleteEvent { event: Some(event) })
    }

    #[test]
    fn a_whole_reply_merges_runs_of_deltas_and_keeps_everything_else_in_order() {
        use pb::complete_event::Event::{Delta, Done, Logprobs};
        let events = vec![
            event(Delta("Hel".into())),
            event(Delta("lo".into())),
            event(Logprobs("[1]".into())),
            event(Delta(" there".into())),
            event(Done(pb::CompleteDone::default())),
            Err(Status::unavailable("gone")),
        ];
        let merged: Vec<_> = merge_deltas(events).into_iter().map(|event| event.map(|event| event.event)).collect();
        assert_eq!(merged.len(), 5);
        assert_eq!(merged[0].as_ref().unwrap(), &Some(Delta("Hello".into())));
        assert_eq!(merged[1].as_ref().unwrap(), &Some(Logprobs("[1]".into())));
        assert_eq!(merged[2].as_ref().unwrap(), &Some(Delta(" there".into())));
        assert_eq!(merged[3].as_ref().unwrap(), &Some(Done(pb::CompleteDone::default())));
        assert_eq!(merged[4].as_ref().unwrap_err().code(), tonic::Code::Unavailable);
    }
}
