//! Running summaries: when a thread no longer fits the model's window, the messages that fall out are
//! folded into the conversation's summary by the summary model, stored in chat and charged to the user.

use parley_platform::events::AiJob;
use parley_proto::chat::v1 as chat_pb;
use parley_proto::quota::v1 as quota_pb;

use crate::context::{TokenCounter, compose, fit_prompt, summary_budget, summary_request};
use crate::provider::Sampling;
use crate::worker::Agent;

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
    pub(crate) async fn summarize(
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
            match provider.client.stream_chat(secret, &target.model, &request, sampling, &mut |_| {}).await {
                Ok(completion) => {
                    provider.breaker.record_success();
                    metrics::counter!(crate::metrics::SUMMARIES, "model" => name.clone()).increment(1);
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
}
