//! LLM providers. One client speaks the OpenAI Chat Completions API with streaming, which covers OpenAI
//! itself, OpenRouter, vLLM, Ollama, llama.cpp's server, Together, Groq and Parley's fake LLM.

use std::time::{Duration, Instant};

use futures::StreamExt;
use parley_platform::config::{ProviderConfig, ProviderKind};
use serde::Serialize;
use serde_json::Value;

/// One message of a prompt, in the provider's wire format.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PromptMessage {
    pub role: String,
    pub content: String,
}

/// A finished model call.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub content: String,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub time_to_first_token: Option<Duration>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("provider answered HTTP {status}: {message}")]
    Status {
        status: u16,
        message: String,
        retry_after: Option<Duration>,
    },
    #[error("could not reach the provider: {0}")]
    Transport(String),
    #[error("provider timed out after {0:?}")]
    Timeout(Duration),
    #[error("provider sent something unreadable: {0}")]
    Protocol(String),
    #[error("provider is not configured: {0}")]
    Misconfigured(String),
}

impl ProviderError {
    /// Worth trying again (here or at the next provider): the provider may answer differently later.
    pub fn is_retryable(&self) -> bool {
        match self {
            ProviderError::Status { status, .. } => *status == 429 || *status == 408 || *status >= 500,
            ProviderError::Transport(_) | ProviderError::Timeout(_) => true,
            ProviderError::Protocol(_) | ProviderError::Misconfigured(_) => false,
        }
    }
}

#[derive(Clone)]
pub struct OpenAiCompatible {
    pub name: String,
    base_url: String,
    api_key: Option<String>,
    http: reqwest::Client,
    total_timeout: Duration,
}

impl OpenAiCompatible {
    pub fn new(
        name: &str,
        config: &ProviderConfig,
        http: reqwest::Client,
        total_timeout: Duration,
    ) -> Result<Self, ProviderError> {
        debug_assert!(matches!(config.kind, ProviderKind::Openai | ProviderKind::Fake));
        if config.base_url.is_empty() {
            return Err(ProviderError::Misconfigured(format!("provider {name} has no base_url")));
        }
        let api_key = match &config.api_key_env {
            Some(variable) => Some(std::env::var(variable).map_err(|_| {
                ProviderError::Misconfigured(format!("provider {name} needs the environment variable {variable}"))
            })?),
            None => None,
        };
        Ok(Self {
            name: name.to_owned(),
            base_url: config.base_url.trim_end_matches('/').to_owned(),
            api_key,
            http,
            total_timeout,
        })
    }

    /// Streams a completion, calling `on_delta` with each piece of text as it arrives.
    pub async fn stream_chat(
        &self,
        model: &str,
        messages: &[PromptMessage],
        max_tokens: u32,
        on_delta: &mut (dyn FnMut(&str) + Send),
    ) -> Result<Completion, ProviderError> {
        let deadline = self.total_timeout;
        match tokio::time::timeout(deadline, self.stream_chat_inner(model, messages, max_tokens, on_delta)).await {
            Ok(result) => result,
            Err(_) => Err(ProviderError::Timeout(deadline)),
        }
    }

    async fn stream_chat_inner(
        &self,
        model: &str,
        messages: &[PromptMessage],
        max_tokens: u32,
        on_delta: &mut (dyn FnMut(&str) + Send),
    ) -> Result<Completion, ProviderError> {
        let started = Instant::now();
        let body = serde_json::json!({
            "model": model,
            "messages": messages,
            "stream": true,
            "stream_options": {"include_usage": true},
            "max_tokens": max_tokens,
        });
        let mut request = self
            .http
            .post(format!("{}/chat/completions", self.base_url))
            .json(&body);
        if let Some(key) = &self.api_key {
            request = request.bearer_auth(key);
        }
        let response = request
            .send()
            .await
            .map_err(|error| ProviderError::Transport(without_url(&error)))?;
        let status = response.status();
        if !status.is_success() {
            let retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let text = response.text().await.unwrap_or_default();
            return Err(ProviderError::Status {
                status: status.as_u16(),
                message: error_message(&text),
                retry_after,
            });
        }
        let mut content = String::new();
        let mut usage: Option<(i64, i64)> = None;
        let mut time_to_first_token = None;
        let mut buffer = Vec::<u8>::new();
        let mut bytes = response.bytes_stream();
        while let Some(chunk) = bytes.next().await {
            let chunk = chunk.map_err(|error| ProviderError::Transport(without_url(&error)))?;
            buffer.extend_from_slice(&chunk);
            while let Some(event) = take_event(&mut buffer) {
                for data in event
                    .lines()
                    .filter_map(|line| line.strip_prefix("data:"))
                    .map(str::trim)
                {
                    if data == "[DONE]" {
                        continue;
                    }
                    let value: Value =
                        serde_json::from_str(data).map_err(|error| ProviderError::Protocol(error.to_string()))?;
                    if let Some(text) = value.pointer("/choices/0/delta/content").and_then(Value::as_str)
                        && !text.is_empty()
                    {
                        time_to_first_token.get_or_insert_with(|| started.elapsed());
                        content.push_str(text);
                        on_delta(text);
                    }
                    if let Some(reported) = value.get("usage").filter(|usage| !usage.is_null()) {
                        let tokens = |key: &str| reported.get(key).and_then(Value::as_i64).unwrap_or(0);
                        usage = Some((tokens("prompt_tokens"), tokens("completion_tokens")));
                    }
                }
            }
        }
        // Providers that do not report usage get an estimate of about four characters a token.
        let (input_tokens, output_tokens) = usage.unwrap_or_else(|| {
            let prompt: usize = messages.iter().map(|message| message.content.chars().count()).sum();
            (prompt.div_ceil(4) as i64, content.chars().count().div_ceil(4) as i64)
        });
        Ok(Completion {
            content,
            input_tokens,
            output_tokens,
            time_to_first_token,
        })
    }
}

/// Removes and returns the first complete server-sent event (up to a blank line) from `buffer`.
fn take_event(buffer: &mut Vec<u8>) -> Option<String> {
    let position = buffer.windows(2).position(|pair| pair == b"\n\n")?;
    let event: Vec<u8> = buffer.drain(..position + 2).collect();
    Some(String::from_utf8_lossy(&event).replace('\r', ""))
}

/// The `error.message` of an OpenAI-style error body, else a short prefix of the body.
fn error_message(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|value| {
            value
                .pointer("/error/message")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .unwrap_or_else(|| body.chars().take(200).collect())
}

/// A transport error's text without the URL, which may carry a key in its query.
fn without_url(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    if let Some(url) = error.url() {
        text = text.replace(url.as_str(), "<provider>");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_split_on_blank_lines() {
        let mut buffer = b"data: {\"a\":1}\n\ndata: [DONE]\n\ndata: {\"par".to_vec();
        assert_eq!(take_event(&mut buffer).as_deref(), Some("data: {\"a\":1}\n\n"));
        assert_eq!(take_event(&mut buffer).as_deref(), Some("data: [DONE]\n\n"));
        assert_eq!(take_event(&mut buffer), None);
        assert_eq!(buffer, b"data: {\"par");
    }

    #[test]
    fn retryable_failures_are_transient_ones() {
        let status = |status| ProviderError::Status {
            status,
            message: String::new(),
            retry_after: None,
        };
        assert!(status(429).is_retryable());
        assert!(status(503).is_retryable());
        assert!(!status(400).is_retryable());
        assert!(!status(401).is_retryable());
        assert!(ProviderError::Timeout(Duration::from_secs(1)).is_retryable());
        assert!(!ProviderError::Protocol("x".into()).is_retryable());
    }

    #[test]
    fn error_messages_come_from_the_openai_shape() {
        assert_eq!(error_message(r#"{"error":{"message":"bad model"}}"#), "bad model");
        assert_eq!(error_message("plain text"), "plain text");
    }
}
