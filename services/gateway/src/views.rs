//! The JSON shapes of the public API (shared/API.md), and their conversions from the services' messages.

use parley_platform::timestamps::proto_to_rfc3339;
use parley_proto::{analytics::v1 as analytics_pb, chat::v1 as chat_pb, user::v1 as user_pb};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Serialize, ToSchema)]
pub struct UserView {
    pub id: String,
    pub email: String,
    pub display_name: Option<String>,
    pub tier: String,
    pub role: String,
    pub created_at: Option<String>,
}

impl From<user_pb::User> for UserView {
    fn from(user: user_pb::User) -> Self {
        Self {
            created_at: proto_to_rfc3339(user.created_at.as_ref()),
            id: user.id,
            email: user.email,
            display_name: user.display_name,
            tier: user.tier,
            role: user.role,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AuthView {
    pub user: Option<UserView>,
    pub access_token: String,
    pub refresh_token: String,
    /// Always "Bearer".
    pub token_type: &'static str,
    /// Seconds until the access token expires.
    pub expires_in: i64,
}

impl From<user_pb::AuthResponse> for AuthView {
    fn from(response: user_pb::AuthResponse) -> Self {
        Self {
            user: response.user.map(UserView::from),
            access_token: response.access_token,
            refresh_token: response.refresh_token,
            token_type: "Bearer",
            expires_in: response.expires_in,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ConversationView {
    pub id: String,
    pub title: Option<String>,
    pub model: String,
    pub system_prompt: Option<String>,
    pub created_at: Option<String>,
    pub updated_at: Option<String>,
    pub version: i64,
}

impl From<chat_pb::Conversation> for ConversationView {
    fn from(conversation: chat_pb::Conversation) -> Self {
        Self {
            created_at: proto_to_rfc3339(conversation.created_at.as_ref()),
            updated_at: proto_to_rfc3339(conversation.updated_at.as_ref()),
            id: conversation.id,
            title: conversation.title,
            model: conversation.model,
            system_prompt: conversation.system_prompt,
            version: conversation.version,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UsageView {
    pub input_tokens: i64,
    pub output_tokens: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MessageErrorView {
    pub code: String,
    pub detail: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MessageView {
    pub id: String,
    pub conversation_id: String,
    /// "user", "assistant" or "system".
    pub role: String,
    pub content: String,
    /// "pending", "streaming", "completed" or "failed".
    pub status: String,
    pub model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageView>,
    pub created_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<String>,
    /// Why the message failed, when its status is "failed".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<MessageErrorView>,
    /// The message this one follows (null for a conversation's first); messages with one parent and
    /// one role are versions of each other.
    pub parent_id: Option<String>,
    /// Which version of its siblings this message is (1 for the oldest; edits and regenerations add
    /// versions); absent in stream events.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub branch: Option<u32>,
    /// How many versions the message has (see `GET /v1/messages/{id}/siblings`); absent in stream events.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub branches: Option<u32>,
}

impl From<chat_pb::Message> for MessageView {
    fn from(message: chat_pb::Message) -> Self {
        // The API names the state (a state this version does not know keeps the name it came with).
        let status = parley_platform::message_status::MessageStatus::of(&message)
            .map_or_else(|| message.status.clone(), |status| status.as_str().to_owned());
        let error = match (message.error_code, message.error_detail) {
            (Some(code), detail) => Some(MessageErrorView { code, detail: detail.unwrap_or_default() }),
            _ => None,
        };
        Self {
            created_at: proto_to_rfc3339(message.created_at.as_ref()),
            completed_at: proto_to_rfc3339(message.completed_at.as_ref()),
            usage: message
                .usage
                .map(|usage| UsageView { input_tokens: usage.input_tokens, output_tokens: usage.output_tokens }),
            id: message.id,
            conversation_id: message.conversation_id,
            role: message.role,
            content: message.content,
            status,
            model: message.model,
            error,
            parent_id: message.parent_id,
            branch: message.branch,
            branches: message.branches,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ExchangeView {
    pub user_message: Option<MessageView>,
    pub assistant_message: Option<MessageView>,
}

/// A page of a list. `next_cursor` is null on the last page.
#[derive(Debug, Serialize, ToSchema)]
pub struct Page<T> {
    pub data: Vec<T>,
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterBody {
    pub email: String,
    pub password: String,
    #[serde(default)]
    pub display_name: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginBody {
    pub email: String,
    pub password: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefreshBody {
    pub refresh_token: String,
}

#[derive(Debug, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct ConversationBody {
    #[serde(default)]
    pub title: Option<String>,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub system_prompt: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SendMessageBody {
    pub content: String,
    #[serde(default)]
    pub model: Option<String>,
    /// Sampling temperature, 0 to 2; 0 makes the reply deterministic and eligible for the response cache.
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Nucleus sampling, 0 to 1.
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Up to 4 sequences (a string or a list) that end the reply where the model writes them.
    #[serde(default)]
    pub stop: Option<Stop>,
    /// Asks the provider for a reproducible reply.
    #[serde(default, deserialize_with = "parley_platform::json_int::optional_integer")]
    pub seed: Option<i64>,
    /// -2 to 2.
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    /// -2 to 2.
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    /// Token id to a bias from -100 to 100.
    #[serde(default, deserialize_with = "parley_platform::json_int::optional_integer_map")]
    pub logit_bias: Option<std::collections::BTreeMap<String, i32>>,
    /// OpenAI's `response_format`: `{"type": "text" | "json_object"}` or `{"type": "json_schema",
    /// "json_schema": {"name", "schema", "strict"}}`.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub response_format: Option<parley_platform::sampling::ResponseFormat>,
    /// The longest reply, at least 1; at most the deployment's longest (`agent.max_output_tokens`).
    #[serde(default, deserialize_with = "parley_platform::json_int::optional_integer")]
    pub max_tokens: Option<i64>,
}

/// How to answer again: another model, or other sampling, than the conversation's (all optional).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegenerateBody {
    #[serde(default)]
    pub model: Option<String>,
    /// Sampling temperature, 0 to 2.
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Nucleus sampling, 0 to 1.
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Asks the provider for a reproducible reply.
    #[serde(default, deserialize_with = "parley_platform::json_int::optional_integer")]
    pub seed: Option<i64>,
    /// The longest reply, at least 1; at most the deployment's longest (`agent.max_output_tokens`).
    #[serde(default, deserialize_with = "parley_platform::json_int::optional_integer")]
    pub max_tokens: Option<i64>,
}

impl RegenerateBody {
    /// As a send's body without content.
    pub fn into_send(self) -> SendMessageBody {
        SendMessageBody {
            content: String::new(),
            model: self.model,
            temperature: self.temperature,
            top_p: self.top_p,
            stop: None,
            seed: self.seed,
            presence_penalty: None,
            frequency_penalty: None,
            logit_bias: None,
            response_format: None,
            max_tokens: self.max_tokens,
        }
    }
}

/// The versions of a message, and the one on the active branch.
#[derive(Debug, Serialize, ToSchema)]
pub struct SiblingsView {
    /// Oldest first, the message itself included.
    pub data: Vec<MessageView>,
    /// The version on the conversation's active branch (null when none of them is).
    pub active_id: Option<String>,
}

impl SendMessageBody {
    /// The sampling parameters, checked.
    pub fn sampling(&self) -> Result<parley_platform::sampling::Sampling, parley_platform::ServiceError> {
        let sampling = parley_platform::sampling::Sampling {
            temperature: self.temperature,
            top_p: self.top_p,
            stop: self.stop.clone().map(Stop::into_list).unwrap_or_default(),
            seed: self.seed,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            logit_bias: self.logit_bias.clone().unwrap_or_default(),
            user: None,
            response_format: self.response_format.clone(),
            // A conversation offers no tools (docs/architecture.md, "Sampling parameters").
            ..Default::default()
        };
        sampling.check()?;
        Ok(sampling)
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TierBody {
    pub tier: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UsageRowView {
    /// The day (YYYY-MM-DD), with group_by=day.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub day: Option<String>,
    /// The model, with group_by=model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The user, with group_by=user (admin only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub total_tokens: i64,
    pub requests: i64,
    pub cost_usd: f64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UsageReportView {
    pub from: String,
    pub to: String,
    pub group_by: String,
    pub data: Vec<UsageRowView>,
    pub totals: UsageRowView,
    /// The caller's token budgets as they stand now (own usage only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget: Option<BudgetView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BudgetWindowView {
    pub limit: i64,
    /// Tokens charged in this window.
    pub used: i64,
    /// Tokens held for requests still running.
    pub reserved: i64,
    pub remaining: i64,
    pub resets_at: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BudgetView {
    pub day: Option<BudgetWindowView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub month: Option<BudgetWindowView>,
    /// True when the budget store was unreachable and these figures are conservative.
    pub degraded: bool,
}

impl From<parley_proto::quota::v1::Window> for BudgetWindowView {
    fn from(window: parley_proto::quota::v1::Window) -> Self {
        let resets_at =
            time::OffsetDateTime::from_unix_timestamp(window.resets_at).ok().map(parley_platform::timestamps::rfc3339);
        Self {
            limit: window.limit,
            used: window.used,
            reserved: window.reserved,
            remaining: window.remaining,
            resets_at,
        }
    }
}

impl From<parley_proto::quota::v1::Budget> for BudgetView {
    fn from(budget: parley_proto::quota::v1::Budget) -> Self {
        Self {
            day: budget.day.map(BudgetWindowView::from),
            month: budget.month.map(BudgetWindowView::from),
            degraded: budget.degraded,
        }
    }
}

/// A piece of a search result's snippet.
#[derive(Debug, Serialize, ToSchema)]
pub struct SnippetPartView {
    pub text: String,
    /// True for the query's words.
    pub highlight: bool,
}

/// A search result: a message, or a conversation whose title matched (`message_id` null).
#[derive(Debug, Serialize, ToSchema)]
pub struct SearchHitView {
    pub conversation_id: String,
    /// The conversation's title.
    pub title: Option<String>,
    pub message_id: Option<String>,
    /// The message's role ("user" or "assistant"); null for a title.
    pub role: Option<String>,
    pub created_at: Option<String>,
    /// Relevance: higher is better; results come best first.
    pub rank: f32,
    /// The matched text around its first match, in parts; the query's words have `highlight` true.
    pub snippet: Vec<SnippetPartView>,
}

impl From<chat_pb::SearchHit> for SearchHitView {
    fn from(hit: chat_pb::SearchHit) -> Self {
        Self {
            conversation_id: hit.conversation_id,
            title: hit.conversation_title,
            message_id: hit.message_id,
            role: hit.role,
            created_at: proto_to_rfc3339(hit.created_at.as_ref()),
            rank: hit.rank,
            snippet: hit
                .snippet
                .into_iter()
                .map(|part| SnippetPartView { text: part.text, highlight: part.highlight })
                .collect(),
        }
    }
}

/// A rating of one of the model's replies.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FeedbackBody {
    /// "up" or "down".
    pub rating: String,
    /// Why, in the user's words (up to 2,000 characters); absent or empty for none.
    #[serde(default)]
    pub comment: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct FeedbackView {
    pub message_id: String,
    pub conversation_id: String,
    pub user_id: String,
    /// The model that wrote the reply.
    pub model: String,
    /// "up" or "down".
    pub rating: String,
    pub comment: Option<String>,
    pub created_at: Option<String>,
    pub updated_at: Option<String>,
}

impl From<analytics_pb::Feedback> for FeedbackView {
    fn from(feedback: analytics_pb::Feedback) -> Self {
        let rating = match analytics_pb::Rating::try_from(feedback.rating) {
            Ok(analytics_pb::Rating::Up) => "up",
            Ok(analytics_pb::Rating::Down) => "down",
            Ok(analytics_pb::Rating::Unspecified) | Err(_) => "unknown",
        };
        Self {
            message_id: feedback.message_id,
            conversation_id: feedback.conversation_id,
            user_id: feedback.user_id,
            model: feedback.model,
            rating: rating.to_owned(),
            comment: feedback.comment,
            created_at: proto_to_rfc3339(feedback.created_at.as_ref()),
            updated_at: proto_to_rfc3339(feedback.updated_at.as_ref()),
        }
    }
}

/// How a model's replies were rated.
#[derive(Debug, Serialize, ToSchema)]
pub struct SatisfactionView {
    pub model: String,
    pub up: i64,
    pub down: i64,
    /// The share of ratings that were up, 0 to 1.
    pub satisfaction: f64,
}

impl From<analytics_pb::ModelSatisfaction> for SatisfactionView {
    fn from(row: analytics_pb::ModelSatisfaction) -> Self {
        let rated = row.up + row.down;
        let satisfaction = if rated > 0 { row.up as f64 / rated as f64 } else { 0.0 };
        Self { model: row.model, up: row.up, down: row.down, satisfaction }
    }
}

/// OpenAI's `stop`: one sequence or a list of them.
#[derive(Debug, Clone, serde::Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn into_list(self) -> Vec<String> {
        match self {
            Stop::One(sequence) => vec![sequence],
            Stop::Many(sequences) => sequences,
        }
    }
}
