//! Assembling the prompt for a job: the system prompt, then as many of the most recent messages as fit
//! the model's context window after room is kept for the reply.

use parley_proto::chat::v1 as pb;

use crate::provider::PromptMessage;

/// About four characters a token: a deliberate over-estimate for English, so prompts stay inside the window.
pub fn estimate_tokens(text: &str) -> u32 {
    (text.chars().count() as u32).div_ceil(4) + 4
}

pub fn build_prompt(
    system_prompt: Option<&str>,
    history: &[pb::Message],
    context_window: u32,
    reserved_for_reply: u32,
) -> Vec<PromptMessage> {
    let mut budget = context_window.saturating_sub(reserved_for_reply);
    let system = system_prompt
        .filter(|prompt| !prompt.trim().is_empty())
        .map(|prompt| PromptMessage { role: "system".to_owned(), content: prompt.to_owned() });
    if let Some(system) = &system {
        budget = budget.saturating_sub(estimate_tokens(&system.content));
    }
    let mut kept = Vec::new();
    for message in history.iter().rev() {
        let cost = estimate_tokens(&message.content);
        // The newest message is the question being answered: it is always sent.
        if cost > budget && !kept.is_empty() {
            break;
        }
        budget = budget.saturating_sub(cost);
        kept.push(PromptMessage { role: message.role.clone(), content: message.content.clone() });
    }
    kept.reverse();
    system.into_iter().chain(kept).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(role: &str, content: &str) -> pb::Message {
        pb::Message { role: role.to_owned(), content: content.to_owned(), ..Default::default() }
    }

    #[test]
    fn keeps_the_system_prompt_and_the_newest_messages_that_fit() {
        let history = vec![
            message("user", &"old ".repeat(100)),
            message("assistant", &"older answer ".repeat(10)),
            message("user", "newest question"),
        ];
        let prompt = build_prompt(Some("be brief"), &history, 200, 100);
        assert_eq!(prompt[0].role, "system");
        assert_eq!(prompt.last().map(|m| m.content.as_str()), Some("newest question"));
        assert!(prompt.iter().all(|m| !m.content.starts_with("old ")), "the oldest message does not fit");
    }

    #[test]
    fn the_question_is_sent_even_when_it_alone_exceeds_the_window() {
        let history = vec![message("user", &"x".repeat(10_000))];
        let prompt = build_prompt(None, &history, 100, 50);
        assert_eq!(prompt.len(), 1);
    }
}
