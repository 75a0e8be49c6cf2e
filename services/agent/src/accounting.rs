//! What follows a reply: storing it in chat, announcing it, and reporting its usage in one event that
//! analytics stores and quota settles the tokens from (each idempotent by message id); and ending a
//! message that cannot be answered.

use std::time::Duration;

use parley_platform::ServiceError;
use parley_platform::events::{AiJob, MessageEvent, Settlement, StoredReply, UsageEvent, UsageOutcome};
use parley_platform::message_status::MessageStatus;
use parley_platform::telemetry;
use parley_proto::chat::v1 as chat_pb;
use parley_proto::quota::v1 as quota_pb;
use uuid::Uuid;

use crate::AgentError;
use crate::cache::CachedReply;
use crate::chain::Answer;
use crate::provider::Completion;
use crate::worker::Agent;

/// The stored reply for a `completed` event; `None` when chat's answer is not a completed message.
fn stored_reply(message: &chat_pb::Message) -> Option<StoredReply> {
    let nanos =
        |at| parley_platform::timestamps::from_proto(at).and_then(|at| i64::try_from(at.unix_timestamp_nanos()).ok());
    if MessageStatus::of(message) != Some(MessageStatus::Completed) {
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
        parent_id: message.parent_id.as_deref().and_then(|id| Uuid::parse_str(id).ok()),
    })
}

/// The usage event of a job's call, carrying `charged_tokens` against the job's reservation; what the
/// call itself reported (tokens, provider, timings) is the caller's to fill in. It is dated by its id
/// (a UUIDv7 carries the millisecond it was made: when the request came), not by when it is sent, so
/// an event sent again, however much later, is the same row to analytics (whose key is the id and the
/// time) and is counted once.
fn usage_event(job: &AiJob, model: &str, outcome: UsageOutcome, charged_tokens: i64) -> UsageEvent {
    let occurred_at_ms = dated_by(job.message_id);
    UsageEvent {
        event_id: job.message_id,
        user_id: job.user_id,
        conversation_id: job.conversation_id,
        message_id: job.message_id,
        model: model.to_owned(),
        provider: "unknown".to_owned(),
        provider_model: String::new(),
        input_tokens: 0,
        output_tokens: 0,
        latency_ms: 0,
        time_to_first_token_ms: None,
        cache_hit: false,
        outcome,
        occurred_at_ms,
        settlement: Some(Settlement { reservation_id: job.reservation_id, tokens: charged_tokens }),
        traceparent: None,
    }
}

/// The usage event of a call a job made besides its reply (a summary, an abandoned attempt): dated and
/// identified by `event_id` (derived, so reporting it again counts once), charged `charged_tokens`
/// outside the job's reservation, which belongs to the reply.
fn side_call_event(job: &AiJob, event_id: Uuid, model: &str, outcome: UsageOutcome, charged_tokens: i64) -> UsageEvent {
    UsageEvent {
        event_id,
        message_id: event_id,
        occurred_at_ms: dated_by(event_id),
        settlement: Some(Settlement { reservation_id: None, tokens: charged_tokens }),
        ..usage_event(job, model, outcome, charged_tokens)
    }
}

/// The id of an event derived from `id` (a UUIDv7): the same time, other random bits (`id`'s XORed
/// with `tag`), so it is dated like `id`, differs from it and from other tags' events, and is the same
/// every time it is made (idempotent).
pub(crate) fn derived_event_id(id: Uuid, tag: [u8; 8]) -> Uuid {
    let mut bytes = *id.as_bytes();
    // The last eight bytes hold the variant bits and 62 random bits: flip the random ones.
    for (byte, tag) in bytes[8..].iter_mut().zip(tag) {
        *byte ^= tag;
    }
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    Uuid::from_bytes(bytes)
}

/// The Unix milliseconds a UUIDv7 was made at (now, for an id that carries no time).
fn dated_by(id: Uuid) -> i64 {
    id.get_timestamp().map_or_else(
        || (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64,
        |stamp| {
            let (secs, nanos) = stamp.to_unix();
            secs as i64 * 1000 + i64::from(nanos / 1_000_000)
        },
    )
}

/// What a call consumed before it failed: the prompt the model read and the part of the reply it had
/// streamed, counted by the agent (a broken stream reports no usage). Zero when the model never started
/// answering (no provider bills a refused or failed request).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Consumed {
    pub(crate) input_tokens: i64,
    pub(crate) output_tokens: i64,
}

impl Consumed {
    /// A reply that broke off after `streamed` reached clients, to a prompt of `input_tokens`.
    pub(crate) fn partial(input_tokens: i64, streamed: &str) -> Self {
        if streamed.is_empty() {
            return Self::default();
        }
        Self { input_tokens, output_tokens: i64::from(parley_platform::tokens::estimate(streamed)) }
    }
}

impl Agent {
    /// Answers a job with a cached reply: one delta with the whole text, then the usual storing and
    /// accounting (no tokens are charged for a reply nobody generated).
    pub(crate) async fn answer_from_cache(
        &self,
        job: &AiJob,
        delivered: i64,
        model: &str,
        reply: CachedReply,
        how: &'static str,
        prompt_tokens: i64,
    ) -> Result<(), AgentError> {
        metrics::counter!(crate::metrics::LLM_CACHE_REQUESTS, "outcome" => how).increment(1);
        let index = self.start_deltas(job, delivered, prompt_tokens).await;
        let subject = self.names.message_events_subject(job.message_id);
        let delta = MessageEvent::Delta { message_id: job.message_id, index, text: reply.content.clone() };
        self.publish_event(&subject, &delta).await;
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
        let answer =
            Answer { completion, provider, provider_model: String::new(), elapsed: Duration::ZERO, cache_hit: true };
        self.store(job, model, &answer).await
    }

    /// Stores the reply, then charges and reports it.
    pub(crate) async fn store(&self, job: &AiJob, model: &str, answer: &Answer) -> Result<(), AgentError> {
        let request = chat_pb::CompleteMessageRequest {
            message_id: job.message_id.to_string(),
            content: answer.completion.content.clone(),
            usage: Some(chat_pb::Usage {
                input_tokens: answer.completion.input_tokens,
                output_tokens: answer.completion.output_tokens,
            }),
            model: model.to_owned(),
            conversation_id: job.conversation_id.to_string(),
            user_id: job.user_id.to_string(),
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
    pub(crate) async fn account(&self, job: &AiJob, model: &str, answer: &Answer) -> Result<(), AgentError> {
        self.charge_and_report(job, model, answer).await?;
        self.announce_completed(job, None).await;
        Ok(())
    }

    pub(crate) async fn announce_completed(&self, job: &AiJob, reply: Option<StoredReply>) {
        let subject = self.names.message_events_subject(job.message_id);
        self.publish_event(&subject, &MessageEvent::Completed { message_id: job.message_id, reply }).await;
    }

    /// Publishes the usage event, idempotent by the job's message id. It carries the charge: the quota
    /// service settles the job's reservation with these tokens when it reads the event (analytics reads
    /// the same event), so a call is charged and reported together or not at all, with no call of its own.
    pub(crate) async fn charge_and_report(&self, job: &AiJob, model: &str, answer: &Answer) -> Result<(), AgentError> {
        // A cached reply cost no model tokens, so it costs the user none of their budget either.
        let tokens =
            if answer.cache_hit { 0 } else { answer.completion.input_tokens + answer.completion.output_tokens };
        let event = UsageEvent {
            provider: answer.provider.clone(),
            provider_model: answer.provider_model.clone(),
            input_tokens: answer.completion.input_tokens,
            output_tokens: answer.completion.output_tokens,
            latency_ms: answer.elapsed.as_millis() as i64,
            time_to_first_token_ms: answer.completion.time_to_first_token.map(|ttft| ttft.as_millis() as i64),
            cache_hit: answer.cache_hit,
            ..usage_event(job, model, UsageOutcome::Completed, tokens)
        };
        self.publish_usage(event).await
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
        let prompt_tokens = self.prompt_tokens(model, prompt);
        let longest_reply = i64::from(self.longest_reply(job));
        if held.is_some_and(|held| prompt_tokens + longest_reply <= held) {
            return true;
        }
        let tokens = prompt_tokens + longest_reply;
        // Raised in Redis with quota's script when it can decide alone; else by the quota service.
        if let Some(mut redis) = self.redis.clone() {
            let id = reservation_id.to_string();
            let raised = self.reserver.reserve_quickly(&mut redis, job.user_id, &job.tier, &id, tokens).await;
            if let Ok(Some(reservation)) = raised {
                return reservation.granted;
            }
        }
        let request = quota_pb::ReserveRequest {
            user_id: job.user_id.to_string(),
            tier: job.tier.clone(),
            reservation_id: reservation_id.to_string(),
            tokens,
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

    /// The longest reply `job` may have: what its client asked for, at most `agent.max_output_tokens`.
    pub(crate) fn longest_reply(&self, job: &AiJob) -> u32 {
        job.max_output_tokens(self.config.agent.max_output_tokens)
    }

    /// The prompt's tokens as this agent counts them (tiktoken, or the estimate, both at or above what
    /// providers report).
    pub(crate) fn prompt_tokens(
        &self,
        model: &parley_platform::config::ModelConfig,
        prompt: &[crate::provider::PromptMessage],
    ) -> i64 {
        let counter = crate::context::TokenCounter::for_model(&self.config, model);
        prompt.iter().map(|message| i64::from(counter.count_message(message))).sum()
    }

    /// Reports a side call (a running summary, a title) in a usage event of its own (outcome
    /// [`UsageOutcome::Summary`] or [`UsageOutcome::Title`], priced by the summary model, dated and identified by `event_id`), whose
    /// charge quota takes against the day's and the month's budgets: it is paid for like any call, once.
    pub(crate) async fn report_side_call(
        &self,
        job: &AiJob,
        event_id: Uuid,
        summary: &crate::summaries::SideCall,
        outcome: UsageOutcome,
    ) -> Result<(), AgentError> {
        let answer = &summary.answer;
        let (input_tokens, output_tokens) =
            (answer.completion.input_tokens.max(0), answer.completion.output_tokens.max(0));
        let charged = input_tokens + output_tokens;
        let event = UsageEvent {
            provider: answer.provider.clone(),
            provider_model: answer.provider_model.clone(),
            input_tokens,
            output_tokens,
            latency_ms: answer.elapsed.as_millis() as i64,
            ..side_call_event(job, event_id, &summary.model, outcome, charged)
        };
        self.publish_usage(event).await
    }

    /// Reports an attempt that streamed part of a reply, up to delta `last_index`, and died with its
    /// agent: a `failed` usage event of its own (its id made from the message and that index, so an agent
    /// that reports it and dies before resetting the reply does not get it charged twice), charged what
    /// it consumed against the day and the month (the job's reservation belongs to the attempt that
    /// answers).
    pub(crate) async fn report_abandoned(
        &self,
        job: &AiJob,
        last_index: u64,
        consumed: Consumed,
    ) -> Result<(), AgentError> {
        let mut tag = *b"abandon!";
        for (byte, index) in tag.iter_mut().zip(last_index.to_le_bytes()) {
            *byte ^= index;
        }
        let event_id = derived_event_id(job.message_id, tag);
        let charged = consumed.input_tokens + consumed.output_tokens;
        let event = UsageEvent {
            input_tokens: consumed.input_tokens,
            output_tokens: consumed.output_tokens,
            ..side_call_event(job, event_id, &job.model, UsageOutcome::Failed, charged)
        };
        self.publish_usage(event).await
    }

    /// Reports a call that ended failed: a usage event with outcome `failed`, which carries what the
    /// call consumed as its charge (nothing when the model never started answering) and so also
    /// releases the rest of the reservation. Analytics counts it among the failures.
    pub(crate) async fn report_failure(&self, job: &AiJob, consumed: Consumed) -> Result<(), AgentError> {
        let charged = consumed.input_tokens + consumed.output_tokens;
        let event = UsageEvent {
            input_tokens: consumed.input_tokens,
            output_tokens: consumed.output_tokens,
            ..usage_event(job, &job.model, UsageOutcome::Failed, charged)
        };
        self.publish_usage(event).await
    }

    /// Publishes a usage event with the current trace context (with others of this agent's, when
    /// they come together: [`crate::usage`]), returning once it is stored.
    pub(crate) async fn publish_usage(&self, event: UsageEvent) -> Result<(), AgentError> {
        let event = UsageEvent { traceparent: telemetry::current_traceparent(), ..event };
        self.usage.publish(event).await
    }

    /// Keeps a job that was given up on in the dead-letter stream, with the reason in a header.
    pub(crate) async fn dead_letter(&self, payload: &[u8], reason: &str) -> Result<(), AgentError> {
        let mut headers = async_nats::HeaderMap::new();
        let reason: String = reason.chars().filter(|c| !c.is_control()).take(500).collect();
        headers.insert("Parley-Dead-Reason", reason.as_str());
        let ack = self
            .jetstream
            .publish_with_headers(self.names.dead_jobs_subject(), headers, payload.to_vec().into())
            .await
            .map_err(|error| AgentError::Nats(error.to_string()))?;
        ack.await.map_err(|error| AgentError::Nats(error.to_string()))?;
        metrics::counter!(crate::metrics::DEAD_JOBS).increment(1);
        Ok(())
    }

    /// Ends the message `failed` with a reason, reports what the call consumed, announces it, and keeps
    /// the job in the dead-letter stream.
    pub(crate) async fn fail(
        &self,
        job: &AiJob,
        code: &str,
        detail: &str,
        partial_content: Option<String>,
        consumed: Consumed,
    ) -> Result<(), AgentError> {
        let request = chat_pb::FailMessageRequest {
            message_id: job.message_id.to_string(),
            code: code.to_owned(),
            detail: detail.to_owned(),
            partial_content,
            conversation_id: job.conversation_id.to_string(),
        };
        self.chat.clone().fail_message(request).await.map_err(ServiceError::from)?;
        if let Ok(payload) = serde_json::to_vec(job) {
            self.dead_letter(&payload, &format!("{code}: {detail}")).await?;
        }
        // Charged what was consumed, and the rest of the reservation given back, instead of it being
        // held until it expires.
        self.report_failure(job, consumed).await?;
        let subject = self.names.message_events_subject(job.message_id);
        let event =
            MessageEvent::Failed { message_id: job.message_id, code: code.to_owned(), detail: detail.to_owned() };
        self.publish_event(&subject, &event).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_sent_again_later_is_the_same_event() {
        // A message made at 2026-01-01T00:00:00.250Z, its event sent (again) now.
        let made = uuid::Timestamp::from_unix(uuid::NoContext, 1_767_225_600, 250_000_000);
        let job = AiJob {
            job_id: Uuid::now_v7(),
            message_id: Uuid::new_v7(made),
            conversation_id: Uuid::nil(),
            user_id: Uuid::now_v7(),
            model: "m".to_owned(),
            tier: "free".to_owned(),
            sampling: Default::default(),
            cache: parley_platform::events::CacheDirective { read: true, write: true },
            reservation_id: None,
            max_tokens: None,
            context: None,
        };
        let event = usage_event(&job, "m", UsageOutcome::Completed, 5);
        assert_eq!(event.event_id, job.message_id);
        assert_eq!(event.occurred_at_ms, 1_767_225_600_250, "dated by the id, not by the clock");
    }
}
