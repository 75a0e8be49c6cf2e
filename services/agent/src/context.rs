//! Assembling the prompt for a job: the system prompt, the running summary of earlier messages (if the
//! thread has outgrown the window), then as many of the most recent messages as fit the model's context
//! window after room is kept for the reply. Tokens are counted with the model's own tokenizer for
//! OpenAI models and estimated (about four characters a token) for the others.

use parley_platform::Config;
use parley_platform::config::{ModelConfig, ProviderKind};
use parley_proto::chat::v1 as pb;
use tiktoken_rs::CoreBPE;

use crate::provider::PromptMessage;

/// Tokens a chat format spends on each message beyond its text (role, separators).
use parley_platform::tokens::PER_MESSAGE_OVERHEAD;

pub enum TokenCounter {
    Bpe(&'static CoreBPE),
    Estimate,
}

impl TokenCounter {
    /// The tokenizer of the model's first provider/model pair when that is an OpenAI model tiktoken
    /// knows, else the estimate.
    pub fn for_model(config: &Config, model: &ModelConfig) -> Self {
        let Some(target) = model.chain.first() else {
            return TokenCounter::Estimate;
        };
        let is_openai =
            config.providers.get(&target.provider).is_some_and(|provider| provider.kind == ProviderKind::Openai);
        if !is_openai {
            return TokenCounter::Estimate;
        }
        match tiktoken_rs::tokenizer::get_tokenizer(&target.model) {
            Some(tiktoken_rs::tokenizer::Tokenizer::O200kBase) => {
                TokenCounter::Bpe(tiktoken_rs::o200k_base_singleton())
            }
            Some(tiktoken_rs::tokenizer::Tokenizer::Cl100kBase) => {
                TokenCounter::Bpe(tiktoken_rs::cl100k_base_singleton())
            }
            _ => TokenCounter::Estimate,
        }
    }

    /// A prompt message: its text, and each of its images as [`parley_platform::tokens::IMAGE_ESTIMATE`].
    pub fn count_message(&self, message: &PromptMessage) -> u32 {
        self.count(&message.content)
            .saturating_add(message.images().saturating_mul(parley_platform::tokens::IMAGE_ESTIMATE))
    }

    pub fn count(&self, text: &str) -> u32 {
        let tokens = match self {
            TokenCounter::Bpe(bpe) => bpe.count_ordinary(text) as u32,
            TokenCounter::Estimate => parley_platform::tokens::estimate(text),
        };
        tokens + PER_MESSAGE_OVERHEAD
    }
}

/// A prompt that fits, and how many of the oldest history messages it had to leave out.
pub struct Fitted {
    pub prompt: Vec<PromptMessage>,
    pub dropped: usize,
}

pub fn summary_message(summary: &str) -> PromptMessage {
    PromptMessage::new("system", format!("Summary of the earlier conversation: {summary}"))
}

pub fn fit_prompt(
    system_prompt: Option<&str>,
    summary: Option<&str>,
    history: &[pb::Message],
    context_window: u32,
    reserved_for_reply: u32,
    counter: &TokenCounter,
) -> Fitted {
    let mut budget = context_window.saturating_sub(reserved_for_reply);
    let mut head = Vec::new();
    if let Some(prompt) = system_prompt.filter(|prompt| !prompt.trim().is_empty()) {
        head.push(PromptMessage::new("system", prompt));
    }
    if let Some(summary) = summary.filter(|summary| !summary.trim().is_empty()) {
        head.push(summary_message(summary));
    }
    for message in &head {
        budget = budget.saturating_sub(counter.count(&message.content));
    }
    let mut kept = Vec::new();
    // The messages before the window are those from index `dropped` down.
    let mut dropped = history.len();
    for (index, message) in history.iter().enumerate().rev() {
        // An empty message (a reply stopped before its first word) says nothing, and some
        // providers refuse an empty turn: it stays in the window without being sent.
        if message.content.trim().is_empty() {
            dropped = index;
            continue;
        }
        let cost = counter.count(&message.content);
        // The newest message is the question being answered: it is always sent.
        if cost > budget && !kept.is_empty() {
            break;
        }
        budget = budget.saturating_sub(cost);
        kept.push(PromptMessage::new(message.role.clone(), message.content.clone()));
        dropped = index;
    }
    kept.reverse();
    Fitted { prompt: head.into_iter().chain(kept).collect(), dropped }
}

/// The prompt of a system prompt, a summary and messages, in that order.
pub fn compose(system_prompt: Option<&str>, summary: Option<&str>, messages: &[pb::Message]) -> Vec<PromptMessage> {
    let system =
        system_prompt.filter(|prompt| !prompt.trim().is_empty()).map(|prompt| PromptMessage::new("system", prompt));
    let summary = summary.filter(|summary| !summary.trim().is_empty()).map(summary_message);
    let messages = messages
        .iter()
        .filter(|message| !message.content.trim().is_empty())
        .map(|message| PromptMessage::new(message.role.clone(), message.content.clone()));
    system.into_iter().chain(summary).chain(messages).collect()
}

/// The room kept for a running summary: a quarter of the window, at most `limit` tokens.
pub fn summary_budget(context_window: u32, limit: u32) -> u32 {
    (context_window / 4).min(limit)
}

/// The request that folds `dropped` messages into the running summary.
pub fn summary_request(previous: Option<&str>, dropped: &[pb::Message]) -> Vec<PromptMessage> {
    let mut transcript = String::new();
    for message in dropped {
        transcript.push_str(&format!("{}: {}\n", message.role, message.content));
    }
    let instructions = "You keep a running summary of a conversation. Fold the new messages into the current \
                        summary. Keep facts, names, numbers, decisions and open questions. Answer with the \
                        updated summary only, in at most 200 words.";
    let content = format!(
        "Current summary: {}\n\nNew messages:\n{transcript}",
        previous.filter(|summary| !summary.is_empty()).unwrap_or("(none yet)")
    );
    vec![PromptMessage::new("system", instructions), PromptMessage::new("user", content)]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(role: &str, content: &str) -> pb::Message {
        pb::Message { role: role.to_owned(), content: content.to_owned(), ..Default::default() }
    }

    #[test]
    fn keeps_the_system_prompt_the_summary_and_the_newest_messages_that_fit() {
        let history = vec![
            message("user", &"old ".repeat(100)),
            message("assistant", &"older answer ".repeat(10)),
            message("user", "newest question"),
        ];
        let fitted = fit_prompt(Some("be brief"), Some("they talked"), &history, 200, 100, &TokenCounter::Estimate);
        assert_eq!(fitted.prompt[0].content, "be brief");
        assert!(fitted.prompt[1].content.contains("they talked"));
        assert_eq!(fitted.prompt.last().map(|m| m.content.as_str()), Some("newest question"));
        assert_eq!(fitted.dropped, 1, "the oldest message does not fit");
    }

    #[test]
    fn an_empty_reply_is_not_sent_and_does_not_move_the_window() {
        let history = vec![
            message("user", "first"),
            message("assistant", ""),
            message("user", "second"),
            message("assistant", "an answer"),
            message("user", "third"),
        ];
        let fitted = fit_prompt(None, None, &history, 10_000, 100, &TokenCounter::Estimate);
        let sent: Vec<&str> = fitted.prompt.iter().map(|m| m.content.as_str()).collect();
        assert_eq!(sent, ["first", "second", "an answer", "third"]);
        assert_eq!(fitted.dropped, 0);
        assert_eq!(compose(None, None, &history).len(), 4);
    }

    #[test]
    fn the_question_is_sent_even_when_it_alone_exceeds_the_window() {
        let history = vec![message("user", &"x".repeat(10_000))];
        let fitted = fit_prompt(None, None, &history, 100, 50, &TokenCounter::Estimate);
        assert_eq!(fitted.prompt.len(), 1);
        assert_eq!(fitted.dropped, 0);
    }

    #[test]
    fn openai_models_are_counted_with_their_tokenizer() {
        let config = Config::from_toml(include_str!("../../../config/parley.example.toml")).unwrap();
        let counter = TokenCounter::for_model(&config, &config.models["gpt-4o-mini"]);
        assert!(matches!(counter, TokenCounter::Bpe(_)));
        // "hello world" is two o200k tokens; the estimate would say three.
        assert_eq!(counter.count("hello world"), 2 + PER_MESSAGE_OVERHEAD);
        let fake = TokenCounter::for_model(&config, &config.models["parley-fake"]);
        assert!(matches!(fake, TokenCounter::Estimate));
    }

    #[test]
    fn the_summary_request_carries_the_previous_summary_and_the_dropped_messages() {
        let request = summary_request(Some("Ada likes tea."), &[message("user", "I moved to Paris")]);
        assert!(request[1].content.contains("Ada likes tea."));
        assert!(request[1].content.contains("user: I moved to Paris"));
    }
}
