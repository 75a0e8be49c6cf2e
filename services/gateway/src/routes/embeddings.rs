//! OpenAI's Embeddings API: `POST /v1/embeddings`, routed by model like chat: to a model configured
//! with `kind = "embeddings"`, whose chain of OpenAI-compatible providers an agent calls
//! (`parley.agent.v1.AgentService/Embed`) with the same retries, breakers, key pools and fallbacks.
//! The rate limit and a budget reservation of the inputs' estimated tokens come first; the agent
//! charges what the provider counted and reports the usage. Errors use OpenAI's shape.

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use base64::Engine;
use bytes::Bytes;
use parley_proto::agent::v1 as agent_pb;
use serde::Deserialize;
use serde_json::{Value, json};

use super::openai::{OpenAiError, OpenAiResult, check_model, json_body};
use crate::AppState;
use crate::auth::Caller;
use crate::problem::ApiError;

/// The most inputs one request may carry (OpenAI's own limit).
const MAX_INPUTS: usize = 2048;
/// The longest vector a client may ask for: past the largest embedding models' (3,072), and small
/// enough that a request of many short inputs cannot ask for gigabytes of vectors.
pub const MAX_DIMENSIONS: i64 = 4_096;
/// The longest `user`.
const MAX_USER_CHARS: usize = 256;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EmbeddingsRequest {
    model: String,
    input: Value,
    #[serde(default)]
    encoding_format: Option<String>,
    #[serde(default, deserialize_with = "parley_platform::json_int::optional_integer")]
    dimensions: Option<i64>,
    #[serde(default)]
    user: Option<String>,
}

/// How the vectors are written: JSON numbers, or base64 of their little-endian 32-bit floats.
#[derive(Clone, Copy)]
enum Encoding {
    Float,
    Base64,
}

impl EmbeddingsRequest {
    /// The texts to embed: one string, or a list of them; each non-empty and within the message limit.
    fn inputs(&self, max_chars: usize) -> OpenAiResult<Vec<String>> {
        let invalid = |message: String| OpenAiError::invalid_param("input", format!("input: {message}"));
        let inputs = match &self.input {
            Value::String(text) => vec![text.clone()],
            Value::Array(items) if items.iter().all(Value::is_string) => {
                items.iter().filter_map(|item| item.as_str().map(str::to_owned)).collect()
            }
            Value::Array(_) => return Err(invalid("token arrays are not served; send the text".to_owned())),
            _ => return Err(invalid("must be a string or a list of strings".to_owned())),
        };
        if inputs.is_empty() || inputs.len() > MAX_INPUTS {
            return Err(invalid(format!("must hold 1 to {MAX_INPUTS} texts")));
        }
        for (index, text) in inputs.iter().enumerate() {
            if text.is_empty() || text.chars().count() > max_chars {
                return Err(invalid(format!("[{index}] must be 1 to {max_chars} characters")));
            }
        }
        Ok(inputs)
    }

    fn encoding(&self) -> OpenAiResult<Encoding> {
        match self.encoding_format.as_deref() {
            None | Some("float") => Ok(Encoding::Float),
            Some("base64") => Ok(Encoding::Base64),
            Some(_) => Err(OpenAiError::invalid_param("encoding_format", "encoding_format: must be float or base64")),
        }
    }

    fn dimensions(&self) -> OpenAiResult<u32> {
        match self.dimensions {
            None => Ok(0),
            Some(dimensions) if (1..=MAX_DIMENSIONS).contains(&dimensions) => Ok(dimensions as u32),
            Some(_) => {
                let message = format!("dimensions: must be between 1 and {MAX_DIMENSIONS}");
                Err(OpenAiError::invalid_param("dimensions", message))
            }
        }
    }

    fn user(&self) -> OpenAiResult<String> {
        let user = self.user.clone().unwrap_or_default();
        if user.chars().count() > MAX_USER_CHARS || user.contains('\0') {
            let message = format!("user: must be at most {MAX_USER_CHARS} characters, without NUL");
            return Err(OpenAiError::invalid_param("user", message));
        }
        Ok(user)
    }
}

/// Create embeddings (OpenAI wire format).
#[utoipa::path(post, path = "/v1/embeddings", tag = "openai", security(("bearer" = [])), responses(
    (status = 200, description = "An OpenAI list of embedding objects, with usage"),
    (status = 400, description = "OpenAI error shape; param names the field"),
    (status = 404, description = "Unknown model (OpenAI error shape, code model_not_found)"),
    (status = 429, description = "Rate limit or token budget (OpenAI error shape)"),
    (status = 503, description = "Every provider of the model failed (OpenAI error shape, with Retry-After)"),
))]
pub async fn embeddings(
    State(state): State<AppState>,
    caller: Result<Caller, ApiError>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> OpenAiResult<Json<Value>> {
    let caller = caller?;
    let request: EmbeddingsRequest = json_body(&headers, body)?;
    check_model(&state, &request.model, "embeddings")?;
    let inputs = request.inputs(state.config.chat.max_message_chars)?;
    let encoding = request.encoding()?;
    let call = agent_pb::EmbedRequest {
        embedding_id: uuid::Uuid::now_v7().to_string(),
        user_id: caller.user_id.to_string(),
        tier: caller.tier.clone(),
        model: request.model.clone(),
        dimensions: request.dimensions()?,
        user: request.user()?,
        // Filled in once the budget is reserved.
        reservation_id: String::new(),
        inputs,
    };
    let estimated_tokens: i64 = call.inputs.iter().map(|text| i64::from(parley_platform::tokens::estimate(text))).sum();
    let reply = super::completion::with_reservation(&state, &caller, estimated_tokens, move |state, reservation_id| {
        let call = agent_pb::EmbedRequest { reservation_id, ..call };
        async move { state.backends.agent.clone().embed(call).await.map(tonic::Response::into_inner) }
    })
    .await?;
    let data: Vec<Value> = reply
        .embeddings
        .into_iter()
        .enumerate()
        .map(|(index, embedding)| {
            let vector = match encoding {
                Encoding::Float => json!(embedding.values),
                Encoding::Base64 => {
                    let bytes: Vec<u8> = embedding.values.iter().flat_map(|value| value.to_le_bytes()).collect();
                    json!(base64::engine::general_purpose::STANDARD.encode(bytes))
                }
            };
            json!({"object": "embedding", "index": index, "embedding": vector})
        })
        .collect();
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "model": request.model,
        "usage": {"prompt_tokens": reply.input_tokens, "total_tokens": reply.input_tokens},
    })))
}
