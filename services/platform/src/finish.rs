//! Why a model stopped, in OpenAI's words, whichever provider said it: the agent reads it from OpenAI's
//! `finish_reason` or Anthropic's `stop_reason`, the gateway answers it in either dialect. A reason no
//! dialect here names passes through as it came.

/// Why a model stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinishReason {
    /// The reply was whole (or a stop sequence ended it).
    Stop,
    /// The longest reply allowed was reached.
    Length,
    /// The model called tools.
    ToolCalls,
    /// The provider withheld (part of) the reply.
    ContentFilter,
    /// A reason neither dialect here names, as the provider said it.
    Other(String),
}

impl FinishReason {
    /// OpenAI's `finish_reason`.
    pub fn from_openai(reason: &str) -> Self {
        match reason {
            "stop" => FinishReason::Stop,
            "length" => FinishReason::Length,
            "tool_calls" => FinishReason::ToolCalls,
            "content_filter" => FinishReason::ContentFilter,
            other => FinishReason::Other(other.to_owned()),
        }
    }

    /// Anthropic's `stop_reason`.
    pub fn from_anthropic(reason: &str) -> Self {
        match reason {
            "end_turn" | "stop_sequence" => FinishReason::Stop,
            "max_tokens" => FinishReason::Length,
            "tool_use" => FinishReason::ToolCalls,
            "refusal" => FinishReason::ContentFilter,
            other => FinishReason::Other(other.to_owned()),
        }
    }

    /// As OpenAI's `finish_reason` says it.
    pub fn as_openai(&self) -> &str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ToolCalls => "tool_calls",
            FinishReason::ContentFilter => "content_filter",
            FinishReason::Other(other) => other,
        }
    }

    /// As Anthropic's `stop_reason` says it (a reason it has no word for is `end_turn`).
    pub fn as_anthropic(&self) -> &'static str {
        match self {
            FinishReason::Length => "max_tokens",
            FinishReason::ToolCalls => "tool_use",
            FinishReason::ContentFilter => "refusal",
            FinishReason::Stop | FinishReason::Other(_) => "end_turn",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_cross_between_the_dialects() {
        for (anthropic, openai) in
            [("end_turn", "stop"), ("max_tokens", "length"), ("tool_use", "tool_calls"), ("refusal", "content_filter")]
        {
            let reason = FinishReason::from_anthropic(anthropic);
            assert_eq!(reason.as_openai(), openai);
            assert_eq!(FinishReason::from_openai(openai), reason);
            assert_eq!(reason.as_anthropic(), anthropic);
        }
        assert_eq!(FinishReason::from_anthropic("stop_sequence"), FinishReason::Stop);
        let unknown = FinishReason::from_openai("function_call");
        assert_eq!(unknown.as_openai(), "function_call");
        assert_eq!(unknown.as_anthropic(), "end_turn");
    }
}
