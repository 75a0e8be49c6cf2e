//! Generated titles: a conversation created without a title gets one from the summary model after its
//! first exchange, stored in chat (unless the user titled it meanwhile) and charged to the user like
//! any call.

use parley_platform::events::{AiJob, UsageOutcome};
use parley_proto::chat::v1 as chat_pb;
use uuid::Uuid;

use crate::provider::PromptMessage;
use crate::worker::Agent;

/// Longest generated title, in tokens asked of the model and in characters kept.
const TITLE_MAX_TOKENS: u32 = 24;
const TITLE_MAX_CHARS: usize = 80;
/// How much of the question and of the reply the title is made from, in characters.
const EXCERPT_CHARS: usize = 1_000;

/// The usage event id of a reply's title call: derived from the reply, so a redelivered job that
/// titles again is charged once.
pub(crate) fn title_event_id(reply: Uuid) -> Uuid {
    crate::accounting::derived_event_id(reply, *b"title!!!")
}

/// The request for a title of an exchange.
pub(crate) fn title_request(question: &str, reply: &str) -> Vec<PromptMessage> {
    let excerpt = |text: &str| text.chars().take(EXCERPT_CHARS).collect::<String>();
    let instructions = "Write a short title, at most six words, for the conversation that starts with the \
                        exchange below. Answer with the title only: no quotes, no trailing period.";
    let content = format!("User: {}\nAssistant: {}", excerpt(question), excerpt(reply));
    vec![PromptMessage::new("system", instructions), PromptMessage::new("user", content)]
}

/// The title in a model's answer: its first non-empty line, without surrounding quotes, a leading
/// "Title:" or a trailing period, cut at a word boundary to [`TITLE_MAX_CHARS`]; `None` when nothing
/// is left.
pub(crate) fn clean_title(answer: &str) -> Option<String> {
    let line = answer.lines().map(str::trim).find(|line| !line.is_empty())?;
    let line = line.strip_prefix("Title:").or_else(|| line.strip_prefix("title:")).unwrap_or(line).trim();
    let line = line.trim_matches(|c: char| matches!(c, '"' | '\'' | '“' | '”' | '*' | '#')).trim();
    let line = line.strip_suffix('.').unwrap_or(line).trim();
    let title: String = line.chars().filter(|c| !c.is_control()).collect();
    if title.chars().count() <= TITLE_MAX_CHARS {
        return (!title.is_empty()).then_some(title);
    }
    let cut: String = title.chars().take(TITLE_MAX_CHARS).collect();
    let cut = match cut.rfind(char::is_whitespace) {
        Some(at) if at > 0 => cut[..at].trim_end().to_owned(),
        _ => cut,
    };
    Some(format!("{cut}…"))
}

impl Agent {
    /// Titles the conversation of `job` from its first exchange when it has no title: a best effort
    /// after the reply is stored (a failure is logged; the conversation stays untitled).
    pub(crate) async fn title_first_exchange(&self, job: &AiJob, context: &chat_pb::JobContext, reply: &str) {
        let first_exchange = !context.history.iter().any(|message| message.role == "assistant");
        if !self.config.agent.titles || !context.untitled || !first_exchange {
            return;
        }
        let Some(question) = context.history.iter().rev().find(|message| message.role == "user") else {
            return;
        };
        let Some(model) = self.config.models.get(&context.model) else {
            return;
        };
        let request = title_request(&question.content, reply);
        let Some(call) = self.side_call(request, &context.model, model, TITLE_MAX_TOKENS, "title").await else {
            return;
        };
        if let Err(error) = self.report_side_call(job, title_event_id(job.message_id), &call, UsageOutcome::Title).await
        {
            tracing::warn!(%error, "could not report the title call; it is not charged");
        }
        let Some(title) = clean_title(&call.text) else {
            return;
        };
        let request = chat_pb::SetGeneratedTitleRequest {
            conversation_id: context.conversation_id.clone(),
            user_id: job.user_id.to_string(),
            title,
        };
        match self.chat.clone().set_generated_title(request).await {
            Ok(response) if response.get_ref().changed => {
                metrics::counter!(crate::metrics::TITLES, "model" => call.model).increment(1);
            }
            Ok(_) => {}
            Err(status) => tracing::warn!(code = ?status.code(), "could not store the generated title"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn titles_are_cleaned_and_kept_short() {
        assert_eq!(clean_title("\"Trip to the Pyrenees.\"\nmore").as_deref(), Some("Trip to the Pyrenees"));
        assert_eq!(clean_title("\n  Title: Green tea  ").as_deref(), Some("Green tea"));
        assert_eq!(clean_title("  \n \"\" "), None);
        let long = clean_title(&"word ".repeat(40)).unwrap();
        assert!(long.ends_with("word…") && long.chars().count() <= TITLE_MAX_CHARS + 1, "{long}");
    }

    #[test]
    fn the_request_carries_both_sides_of_the_exchange() {
        let request = title_request("Where to hike?", &"x".repeat(5_000));
        assert!(request[1].content.starts_with("User: Where to hike?\nAssistant: x"));
        assert!(request[1].content.len() < 2_100);
        assert_ne!(title_event_id(Uuid::now_v7()), crate::summaries::summary_event_id(Uuid::now_v7()));
    }
}
