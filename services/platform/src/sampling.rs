//! How a reply is to be sampled, as the client asked: the OpenAI Chat Completions parameters that pass
//! through Parley to the provider (temperature, top_p, stop, seed, penalties, logit_bias, user,
//! response_format). One type for every hop: the gateway reads it from a request, the gRPC calls carry
//! it as `GenerationOptions`, a conversation's job carries it (its JSON names are OpenAI's, so a job
//! written by an older version reads the same), and the agent writes it into the provider's request.
//!
//! A parameter a model's providers cannot honour is refused before anything is stored or charged
//! ([`check_model`]), never dropped on the way: Anthropic's Messages API has no seed, no penalties, no
//! logit bias and no JSON mode, so a model with an Anthropic provider anywhere in its chain (a fallback
//! included) refuses them.

use std::collections::BTreeMap;

use parley_proto::chat::v1 as pb;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ServiceError;
use crate::config::{Config, ProviderKind};

/// At most this many stop sequences (OpenAI's limit).
pub const MAX_STOP_SEQUENCES: usize = 4;
/// At most this many characters in a stop sequence.
pub const MAX_STOP_CHARS: usize = 256;
/// At most this many entries in `logit_bias`.
pub const MAX_LOGIT_BIAS: usize = 1024;
/// At most this many characters in `user`.
pub const MAX_USER_CHARS: usize = 256;
/// At most this many alternatives per position in `top_logprobs` (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: u32 = 20;
/// At most this many tools in one request (OpenAI's limit).
pub const MAX_TOOLS: usize = 128;

/// A name as OpenAI allows them for functions and JSON schemas: 1 to 64 of `[A-Za-z0-9_-]`.
fn is_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
}

/// The sampling parameters of one request. Absent ones are left to the provider's defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    /// 0 to 2; 0 makes a request deterministic and eligible for the response cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// Nucleus sampling, 0 to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    /// Sequences that end the reply where the model writes them (not included in it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    /// -2 to 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence_penalty: Option<f32>,
    /// -2 to 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frequency_penalty: Option<f32>,
    /// Token id (in decimal) to a bias from -100 to 100.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub logit_bias: BTreeMap<String, i32>,
    /// The end user as the client names them, for the provider's abuse monitoring.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_format: Option<ResponseFormat>,
    /// Function tools the model may call, as OpenAI takes them:
    /// `[{"type": "function", "function": {"name", "description"?, "parameters"?, "strict"?}}]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<Value>,
    /// `"none"`, `"auto"`, `"required"` or `{"type": "function", "function": {"name"}}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel_tool_calls: Option<bool>,
    /// Return each token's log probability.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<bool>,
    /// With `logprobs`: the most likely alternatives to return at each position, 0 to 20.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_logprobs: Option<u32>,
}

/// OpenAI's `response_format`: plain text, any JSON object, or JSON following a schema.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ResponseFormat {
    Text,
    JsonObject,
    /// `{"name", "schema"?, "strict"?, "description"?}`, passed to the provider as it came.
    JsonSchema {
        json_schema: Value,
    },
}

/// Whether a JSON value holds NUL anywhere, in a string or a key.
fn has_nul(value: &Value) -> bool {
    match value {
        Value::String(text) => text.contains('\0'),
        Value::Array(items) => items.iter().any(has_nul),
        Value::Object(entries) => entries.iter().any(|(key, value)| key.contains('\0') || has_nul(value)),
        _ => false,
    }
}

impl Sampling {
    /// Deterministic: only these requests are answered from, or kept in, the response cache.
    pub fn is_deterministic(&self) -> bool {
        self.temperature == Some(0.0)
    }

    /// Whether the response cache may answer or keep this request's reply: deterministic, and answered
    /// in text (the cache keeps text; a request offering tools may be answered with calls).
    pub fn is_cacheable(&self) -> bool {
        self.is_deterministic() && self.tools.is_empty() && !self.wants_logprobs()
    }

    /// Whether the reply is to carry log probabilities.
    pub fn wants_logprobs(&self) -> bool {
        self.logprobs == Some(true)
    }

    /// The names of the function tools offered.
    pub fn tool_names(&self) -> impl Iterator<Item = &str> {
        self.tools.iter().filter_map(|tool| tool.pointer("/function/name").and_then(Value::as_str))
    }

    /// Checks every parameter's range and shape; the error names the parameter (OpenAI's name).
    pub fn check(&self) -> Result<(), ServiceError> {
        let within = |field: &str, value: Option<f32>, low: f32, high: f32| match value {
            Some(value) if !(low..=high).contains(&value) => {
                Err(ServiceError::invalid_field(field, format!("must be between {low} and {high}")))
            }
            _ => Ok(()),
        };
        within("temperature", self.temperature, 0.0, 2.0)?;
        within("top_p", self.top_p, 0.0, 1.0)?;
        within("presence_penalty", self.presence_penalty, -2.0, 2.0)?;
        within("frequency_penalty", self.frequency_penalty, -2.0, 2.0)?;
        if self.stop.len() > MAX_STOP_SEQUENCES {
            return Err(ServiceError::invalid_field("stop", format!("at most {MAX_STOP_SEQUENCES} sequences")));
        }
        for sequence in &self.stop {
            if sequence.is_empty() || sequence.chars().count() > MAX_STOP_CHARS || sequence.contains('\0') {
                let message = format!("each sequence must be 1 to {MAX_STOP_CHARS} characters, without NUL");
                return Err(ServiceError::invalid_field("stop", message));
            }
        }
        if self.logit_bias.len() > MAX_LOGIT_BIAS {
            return Err(ServiceError::invalid_field("logit_bias", format!("at most {MAX_LOGIT_BIAS} entries")));
        }
        for (token, bias) in &self.logit_bias {
            if token.parse::<u32>().is_err() {
                return Err(ServiceError::invalid_field("logit_bias", format!("{token:?} is not a token id")));
            }
            if !(-100..=100).contains(bias) {
                return Err(ServiceError::invalid_field("logit_bias", "biases must be between -100 and 100"));
            }
        }
        if let Some(user) = &self.user
            && (user.chars().count() > MAX_USER_CHARS || user.contains('\0'))
        {
            let message = format!("must be at most {MAX_USER_CHARS} characters, without NUL");
            return Err(ServiceError::invalid_field("user", message));
        }
        if let Some(ResponseFormat::JsonSchema { json_schema }) = &self.response_format {
            let name = json_schema.get("name").and_then(Value::as_str).unwrap_or_default();
            if !json_schema.is_object() || !is_name(name) {
                let message = "json_schema must be an object with a name of 1 to 64 letters, digits, _ or -";
                return Err(ServiceError::invalid_field("response_format", message));
            }
            if json_schema.get("schema").is_some_and(|schema| !schema.is_object()) {
                return Err(ServiceError::invalid_field("response_format", "json_schema.schema must be an object"));
            }
            if json_schema.get("strict").is_some_and(|strict| !strict.is_boolean() && !strict.is_null()) {
                return Err(ServiceError::invalid_field("response_format", "json_schema.strict must be a boolean"));
            }
            if json_schema.get("description").is_some_and(|description| !description.is_string()) {
                return Err(ServiceError::invalid_field("response_format", "json_schema.description must be a string"));
            }
        }
        // Passed on as JSON, and kept with a conversation's job: PostgreSQL's JSON cannot hold NUL.
        for (field, value) in [
            ("response_format", self.response_format.as_ref().and_then(|format| serde_json::to_value(format).ok())),
            ("tools", Some(Value::Array(self.tools.clone()))),
            ("tool_choice", self.tool_choice.clone()),
        ] {
            if value.as_ref().is_some_and(has_nul) {
                return Err(ServiceError::invalid_field(field, "must not contain the NUL character (U+0000)"));
            }
        }
        if let Some(top) = self.top_logprobs {
            if top > MAX_TOP_LOGPROBS {
                return Err(ServiceError::invalid_field(
                    "top_logprobs",
                    format!("must be between 0 and {MAX_TOP_LOGPROBS}"),
                ));
            }
            if !self.wants_logprobs() {
                return Err(ServiceError::invalid_field("top_logprobs", "needs logprobs: true"));
            }
        }
        self.check_tools()
    }

    fn check_tools(&self) -> Result<(), ServiceError> {
        if self.tools.len() > MAX_TOOLS {
            return Err(ServiceError::invalid_field("tools", format!("at most {MAX_TOOLS} tools")));
        }
        for (index, tool) in self.tools.iter().enumerate() {
            let field = format!("tools[{index}]");
            if tool.get("type").and_then(Value::as_str) != Some("function") {
                return Err(ServiceError::invalid_field(field, "type must be \"function\""));
            }
            let name = tool.pointer("/function/name").and_then(Value::as_str).unwrap_or_default();
            if !is_name(name) {
                return Err(ServiceError::invalid_field(
                    field,
                    "function.name must be 1 to 64 letters, digits, _ or -",
                ));
            }
            if tool.pointer("/function/parameters").is_some_and(|parameters| !parameters.is_object()) {
                return Err(ServiceError::invalid_field(field, "function.parameters must be a JSON schema object"));
            }
        }
        let Some(choice) = &self.tool_choice else {
            return Ok(());
        };
        let named = choice.pointer("/function/name").and_then(Value::as_str);
        match (choice.as_str(), named) {
            (Some("none" | "auto"), _) => Ok(()),
            (Some("required"), _) if !self.tools.is_empty() => Ok(()),
            (None, Some(name)) if choice.get("type").and_then(Value::as_str) == Some("function") => {
                if self.tool_names().any(|tool| tool == name) {
                    Ok(())
                } else {
                    Err(ServiceError::invalid_field(
                        "tool_choice",
                        format!("names {name:?}, which is not among the tools"),
                    ))
                }
            }
            _ => Err(ServiceError::invalid_field(
                "tool_choice",
                "must be none, auto, required (with tools) or {\"type\": \"function\", \"function\": {\"name\"}}",
            )),
        }
    }

    /// The first parameter set here that a provider of `kind` cannot honour.
    pub fn unsupported_by(&self, kind: ProviderKind) -> Option<&'static str> {
        match kind {
            ProviderKind::Openai | ProviderKind::Fake => None,
            ProviderKind::Anthropic => {
                let json_mode = matches!(
                    self.response_format,
                    Some(ResponseFormat::JsonObject | ResponseFormat::JsonSchema { .. })
                );
                [
                    ("seed", self.seed.is_some()),
                    ("presence_penalty", self.presence_penalty.is_some()),
                    ("frequency_penalty", self.frequency_penalty.is_some()),
                    ("logit_bias", !self.logit_bias.is_empty()),
                    ("response_format", json_mode),
                    ("logprobs", self.wants_logprobs()),
                ]
                .into_iter()
                .find_map(|(name, set)| set.then_some(name))
            }
        }
    }

    /// Whether some provider could not honour these parameters: only then does a model's chain need
    /// looking at ([`check_model`]).
    pub fn needs_provider_check(&self) -> bool {
        [ProviderKind::Openai, ProviderKind::Anthropic, ProviderKind::Fake]
            .into_iter()
            .any(|kind| self.unsupported_by(kind).is_some())
    }

    /// What the response cache keys on besides the model and prompt: every parameter that changes
    /// what a reply may be. Not `user`, and not `temperature`: only deterministic replies are kept, and
    /// with every provider down a kept reply answers the same request whatever its temperature.
    pub fn cache_identity(&self) -> Value {
        let mut identity = serde_json::to_value(self).unwrap_or_default();
        if let Some(object) = identity.as_object_mut() {
            object.remove("user");
            object.remove("temperature");
        }
        identity
    }

    /// Reads the parameters of a gRPC request and checks them.
    pub fn from_options(options: &pb::GenerationOptions) -> Result<Self, ServiceError> {
        let response_format = if options.response_format.is_empty() {
            None
        } else {
            Some(serde_json::from_str(&options.response_format).map_err(|error| {
                ServiceError::invalid_field("response_format", format!("not a response format: {error}"))
            })?)
        };
        let json = |field: &str, text: &str| -> Result<Option<Value>, ServiceError> {
            if text.is_empty() {
                return Ok(None);
            }
            serde_json::from_str(text)
                .map(Some)
                .map_err(|error| ServiceError::invalid_field(field, format!("not JSON: {error}")))
        };
        let tools = match json("tools", &options.tools)? {
            None => Vec::new(),
            Some(Value::Array(tools)) => tools,
            Some(_) => return Err(ServiceError::invalid_field("tools", "must be an array")),
        };
        let sampling = Self {
            temperature: options.temperature,
            top_p: options.top_p,
            stop: options.stop.clone(),
            seed: options.seed,
            presence_penalty: options.presence_penalty,
            frequency_penalty: options.frequency_penalty,
            logit_bias: options.logit_bias.iter().map(|(token, bias)| (token.clone(), *bias)).collect(),
            user: options.user.clone(),
            response_format,
            tools,
            tool_choice: json("tool_choice", &options.tool_choice)?,
            parallel_tool_calls: options.parallel_tool_calls,
            logprobs: options.logprobs,
            top_logprobs: options.top_logprobs,
        };
        sampling.check()?;
        Ok(sampling)
    }

    /// Writes the parameters into a gRPC request's options (the cache directives and the longest reply
    /// are the caller's to set).
    pub fn to_options(&self) -> pb::GenerationOptions {
        pb::GenerationOptions {
            temperature: self.temperature,
            top_p: self.top_p,
            stop: self.stop.clone(),
            seed: self.seed,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            logit_bias: self.logit_bias.iter().map(|(token, bias)| (token.clone(), *bias)).collect(),
            user: self.user.clone(),
            response_format: self
                .response_format
                .as_ref()
                .and_then(|format| serde_json::to_string(format).ok())
                .unwrap_or_default(),
            tools: if self.tools.is_empty() { String::new() } else { Value::Array(self.tools.clone()).to_string() },
            tool_choice: self.tool_choice.as_ref().map(Value::to_string).unwrap_or_default(),
            parallel_tool_calls: self.parallel_tool_calls,
            logprobs: self.logprobs,
            top_logprobs: self.top_logprobs,
            ..pb::GenerationOptions::default()
        }
    }
}

/// Refuses, naming the parameter, what a provider in `model`'s chain (or in the chain of the model its
/// router sends simple requests to) cannot honour: a fallback must not drop what the first provider
/// would have used.
pub fn check_model(config: &Config, model: &str, sampling: &Sampling) -> Result<(), ServiceError> {
    let Some(entry) = config.models.get(model) else {
        return Ok(());
    };
    let routed = entry.router.as_ref().and_then(|router| config.models.get(&router.model));
    let targets = entry.chain.iter().chain(routed.into_iter().flat_map(|routed| routed.chain.iter()));
    for target in targets {
        let Some(provider) = config.providers.get(&target.provider) else {
            continue;
        };
        if let Some(parameter) = sampling.unsupported_by(provider.kind) {
            let message = format!(
                "model {model:?} cannot honour it: its provider {:?} ({:?}) does not support it",
                target.provider, provider.kind
            );
            return Err(ServiceError::invalid_field(parameter, message));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(result: Result<(), ServiceError>) -> Option<String> {
        result.err().and_then(|error| error.field)
    }

    #[test]
    fn ranges_and_shapes_are_checked_by_name() {
        let bad = [
            (Sampling { temperature: Some(2.5), ..Sampling::default() }, "temperature"),
            (Sampling { top_p: Some(1.5), ..Sampling::default() }, "top_p"),
            (Sampling { presence_penalty: Some(-3.0), ..Sampling::default() }, "presence_penalty"),
            (Sampling { frequency_penalty: Some(2.1), ..Sampling::default() }, "frequency_penalty"),
            (Sampling { stop: vec!["a".into(); 5], ..Sampling::default() }, "stop"),
            (Sampling { stop: vec![String::new()], ..Sampling::default() }, "stop"),
            (Sampling { logit_bias: [("x".to_owned(), 1)].into(), ..Sampling::default() }, "logit_bias"),
            (Sampling { logit_bias: [("5".to_owned(), 101)].into(), ..Sampling::default() }, "logit_bias"),
            (Sampling { user: Some("u".repeat(300)), ..Sampling::default() }, "user"),
            (
                Sampling {
                    response_format: Some(ResponseFormat::JsonSchema {
                        json_schema: serde_json::json!({"name": "a b"}),
                    }),
                    ..Sampling::default()
                },
                "response_format",
            ),
        ];
        let tool = |name: &str| serde_json::json!({"type": "function", "function": {"name": name}});
        let bad = bad.into_iter().chain([
            (Sampling { tools: vec![tool("has space")], ..Sampling::default() }, "tools[0]"),
            (Sampling { tools: vec![serde_json::json!({"type": "retrieval"})], ..Sampling::default() }, "tools[0]"),
            (Sampling { tool_choice: Some(serde_json::json!("required")), ..Sampling::default() }, "tool_choice"),
            (Sampling { top_logprobs: Some(2), ..Sampling::default() }, "top_logprobs"),
            (Sampling { logprobs: Some(true), top_logprobs: Some(21), ..Sampling::default() }, "top_logprobs"),
            (
                Sampling {
                    tools: vec![tool("a")],
                    tool_choice: Some(serde_json::json!({"type": "function", "function": {"name": "b"}})),
                    ..Sampling::default()
                },
                "tool_choice",
            ),
        ]);
        for (sampling, field) in bad {
            assert_eq!(field_of(sampling.check()).as_deref(), Some(field), "{sampling:?}");
        }
        let good = Sampling {
            temperature: Some(0.0),
            top_p: Some(1.0),
            stop: vec!["\n\n".into()],
            seed: Some(-7),
            logit_bias: [("50256".to_owned(), -100)].into(),
            response_format: Some(ResponseFormat::JsonSchema {
                json_schema: serde_json::json!({"name": "reply", "schema": {"type": "object"}, "strict": true}),
            }),
            ..Sampling::default()
        };
        assert!(good.check().is_ok());
    }

    #[test]
    fn options_carry_every_parameter_both_ways() {
        let sampling = Sampling {
            temperature: Some(0.5),
            top_p: Some(0.9),
            stop: vec!["END".into(), "\n".into()],
            seed: Some(42),
            presence_penalty: Some(0.5),
            frequency_penalty: Some(-0.5),
            logit_bias: [("1".to_owned(), 5), ("2".to_owned(), -5)].into(),
            user: Some("end-user-7".into()),
            response_format: Some(ResponseFormat::JsonObject),
            tools: vec![
                serde_json::json!({"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}),
            ],
            tool_choice: Some(serde_json::json!({"type": "function", "function": {"name": "lookup"}})),
            parallel_tool_calls: Some(false),
            logprobs: Some(true),
            top_logprobs: Some(3),
        };
        assert_eq!(Sampling::from_options(&sampling.to_options()).unwrap(), sampling);
        assert_eq!(Sampling::from_options(&pb::GenerationOptions::default()).unwrap(), Sampling::default());
    }

    #[test]
    fn the_json_names_are_openais() {
        let sampling = Sampling {
            stop: vec!["x".into()],
            response_format: Some(ResponseFormat::JsonSchema { json_schema: serde_json::json!({"name": "r"}) }),
            ..Sampling::default()
        };
        assert_eq!(
            serde_json::to_value(&sampling).unwrap(),
            serde_json::json!({"stop": ["x"], "response_format": {"type": "json_schema", "json_schema": {"name": "r"}}})
        );
        assert_eq!(serde_json::to_value(Sampling::default()).unwrap(), serde_json::json!({}));
    }

    #[test]
    fn anthropic_refuses_what_its_api_lacks() {
        assert_eq!(Sampling::default().unsupported_by(ProviderKind::Anthropic), None);
        let stop_and_top_p = Sampling { stop: vec!["x".into()], top_p: Some(0.5), ..Sampling::default() };
        assert_eq!(stop_and_top_p.unsupported_by(ProviderKind::Anthropic), None);
        let seeded = Sampling { seed: Some(1), ..Sampling::default() };
        assert_eq!(seeded.unsupported_by(ProviderKind::Anthropic), Some("seed"));
        assert_eq!(seeded.unsupported_by(ProviderKind::Openai), None);
        let json = Sampling { response_format: Some(ResponseFormat::JsonObject), ..Sampling::default() };
        assert_eq!(json.unsupported_by(ProviderKind::Anthropic), Some("response_format"));
        let logprobs = Sampling { logprobs: Some(true), ..Sampling::default() };
        assert_eq!(logprobs.unsupported_by(ProviderKind::Anthropic), Some("logprobs"));
        let text = Sampling { response_format: Some(ResponseFormat::Text), ..Sampling::default() };
        assert_eq!(text.unsupported_by(ProviderKind::Anthropic), None);
    }
}
