//! Running summaries: when a thread no longer fits the model's window, the messages that fall out are
//! folded into the conversation's summary by the summary model, stored in chat and charged to the user.

use std::time::Instant;

use parley_platform::events::{AiJob, UsageOutcome};
use parley_proto::chat::v1 as chat_pb;
use uuid::Uuid;

use crate::chain::Answer;
use crate::context::{TokenCounter, compose, fit_prompt, summary_budget, summary_request};
use crate::provider::Sampling;
use crate::worker::Agent;

/// A text written by the cheap model on the side of a reply (a running summary, a title): its text,
/// the call that wrote it, and the model it was asked of.
pub(crate) struct SideCall {
    pub(crate) text: String,
    pub(crate) answer: Answer,
    pub(crate) model: String,
}

/// The usage event id of the summary a job's reply needed: a UUIDv7 with the reply's time (so the call
/// is dated and priced when it was made) and other random bits, so it differs from the reply's own
/// event (whose id is the reply's message id) and is the same for a redelivered job that folds the same
/// messages again (one charge, one report).
pub(crate) fn summary_event_id(reply: Uuid) -> Uuid {
    crate::accounting::derived_event_id(reply, *b"summary!")
}

/// Longest running summary, in tokens: it bounds what every later prompt of a long thread carries.
const SUMMARY_MAX_TOKENS: u32 = 400;

impl Agent {
    /// The prompt for a job. When the thread no longer fits the window, the messages that fall out are
    /// folded into the conversation's running summary (stored in chat and reused by later jobs), so
    /// long threads keep their gist while each call's prompt stays within the window.
    pub(crate) async fn assemble_prompt(
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
        let Some(summary) = self.summarize(context.summary.as_deref(), dropped, requested, model, summary_room).await
        else {
            return fitted.prompt;
        };
        if let Some(until) = dropped.last() {
            // The user pays for the summary call too, reported like any call (analytics prices it, quota
            // charges both budgets from the event), once per summary.
            if let Err(error) =
                self.report_side_call(job, summary_event_id(job.message_id), &summary, UsageOutcome::Summary).await
            {
                tracing::warn!(%error, "could not report the summary call; it is not charged");
            }
            let request = chat_pb::UpdateSummaryRequest {
                conversation_id: context.conversation_id.clone(),
                summary: summary.text.clone(),
                until_message_id: until.id.clone(),
            };
            if let Err(status) = self.chat.clone().update_summary(request).await {
                tracing::warn!(code = ?status.code(), "could not store the running summary");
            }
        }
        compose(system, Some(&summary.text), kept)
    }

    /// Folds `dropped` into the running summary with the summary model, with the call that wrote it;
    /// `None` if no provider answered (the prompt then simply leaves those messages out).
    pub(crate) async fn summarize(
        &self,
        previous: Option<&str>,
        dropped: &[chat_pb::Message],
        requested: &str,
        model: &parley_platform::config::ModelConfig,
        max_tokens: u32,
    ) -> Option<SideCall> {
        let summary =
            self.side_call(summary_request(previous, dropped), requested, model, max_tokens, "summary").await?;
        metrics::counter!(crate::metrics::SUMMARIES, "model" => summary.model.clone()).increment(1);
        Some(summary)
    }

    /// Asks the summary model (`agent.summary_model`, else `model`'s router target, else `requested`)
    /// `request`, deterministically, across its chain; `None` if no provider answered.
    pub(crate) async fn side_call(
        &self,
        request: Vec<crate::provider::PromptMessage>,
        requested: &str,
        model: &parley_platform::config::ModelConfig,
        max_tokens: u32,
        what: &'static str,
    ) -> Option<SideCall> {
        let name = self
            .config
            .agent
            .summary_model
            .clone()
            .or_else(|| model.router.as_ref().map(|router| router.model.clone()))
            .unwrap_or_else(|| requested.to_owned());
        let summary_model = self.config.models.get(&name)?;
        let deterministic = parley_platform::sampling::Sampling { temperature: Some(0.0), ..Default::default() };
        let sampling = Sampling { max_tokens, params: &deterministic };
        for target in &summary_model.chain {
            let Some(provider) = self.providers.get(&target.provider) else {
                continue;
            };
            if !provider.breaker.allow() {
                continue;
            }
            let key = provider.keys.pick();
            let secret = key.as_ref().map(|(_, secret)| secret.as_str());
            let started = Instant::now();
            match provider.client.stream_chat(secret, &target.model, &request, sampling, &mut |_| {}).await {
                Ok(mut completion) => {
                    provider.breaker.record_success();
                    let text = std::mem::take(&mut completion.content);
                    let answer = Answer {
                        completion,
                        provider: provider.client.name.clone(),
                        provider_model: target.model.clone(),
                        elapsed: started.elapsed(),
                        cache_hit: false,
                    };
                    return Some(SideCall { text, answer, model: name });
                }
                Err(error) => {
                    if error.is_provider_fault() {
                        provider.breaker.record_failure();
                    } else {
                        provider.breaker.record_success_if_probing();
                    }
                    tracing::warn!(%error, provider = %target.provider, call = what, "side call failed");
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_summary_event_is_dated_like_its_reply_yet_distinct_and_stable() {
        let reply = Uuid::now_v7();
        let id = summary_event_id(reply);
        assert_ne!(id, reply);
        assert_eq!(id, summary_event_id(reply), "the same summary, the same event");
        assert_eq!(id.get_version_num(), 7);
        assert_eq!(id.get_variant(), uuid::Variant::RFC4122);
        assert_eq!(id.get_timestamp(), reply.get_timestamp());
    }
}
