//! Messages that services exchange over NATS. JSON, so they can be read with `nats sub`.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// An AI job: answer the pending assistant message `message_id`. Published by chat's outbox relay with
/// `Nats-Msg-Id` = `job_id`, consumed by agents.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AiJob {
    pub job_id: Uuid,
    pub message_id: Uuid,
    pub conversation_id: Uuid,
    pub user_id: Uuid,
    pub model: String,
    pub tier: String,
    /// How to sample the reply; its fields sit at the top level of the job's JSON (OpenAI's names).
    #[serde(flatten)]
    pub sampling: crate::sampling::Sampling,
    #[serde(default)]
    pub cache: CacheDirective,
    /// The quota reservation to settle with the tokens actually used.
    #[serde(default)]
    pub reservation_id: Option<Uuid>,
    /// The longest reply the client asked for, below the configured longest (`agent.max_output_tokens`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// What the reply needs of its conversation, read by chat right after the send and carried when
    /// small, so that the job's first run need not ask chat for it. Never stored in the outbox: a job
    /// the sweep publishes, one published late or one too large to carry has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<CarriedContext>,
}

/// A reply job's context as carried in the job: the conversation's system prompt and running summary,
/// and the completed messages the reply follows (oldest first, after the summary), in plain text.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CarriedContext {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_prompt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
    /// The conversation has no title yet.
    #[serde(default)]
    pub untitled: bool,
    pub history: Vec<ContextMessage>,
}

/// One message of a carried context.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ContextMessage {
    pub id: Uuid,
    pub role: String,
    pub content: String,
}

/// What the client allowed the response cache to do with this job.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct CacheDirective {
    /// May a cached reply be served?
    pub read: bool,
    /// May this reply be kept?
    pub write: bool,
}

impl Default for CacheDirective {
    fn default() -> Self {
        Self { read: true, write: true }
    }
}

impl AiJob {
    /// Only deterministic requests (temperature 0) answered in text are answered from, or kept in, the
    /// response cache.
    pub fn is_cacheable(&self) -> bool {
        self.sampling.is_cacheable()
    }

    /// The longest reply this job may have: what the client asked for, at most `configured`.
    pub fn max_output_tokens(&self, configured: u32) -> u32 {
        self.max_tokens.map_or(configured, |asked| asked.min(configured))
    }
}

/// What a usage event reports, by its lowercase name on the wire and in `analytics.usage_events`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum UsageOutcome {
    /// A reply or a completion, answered whole.
    Completed,
    /// A call that ended failed; what it consumed is charged all the same.
    Failed,
    /// A running summary's call, charged to the conversation's owner.
    Summary,
    /// A generated title's call, charged to the conversation's owner.
    Title,
}

impl UsageOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            UsageOutcome::Completed => "completed",
            UsageOutcome::Failed => "failed",
            UsageOutcome::Summary => "summary",
            UsageOutcome::Title => "title",
        }
    }
}

/// What an agent reports after a model call. Idempotent by `event_id` (the assistant message id).
///
/// A message of the usage stream carries one event (a JSON object) or several (a JSON array of them,
/// published together by one agent); [`usage_events`] reads either.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UsageEvent {
    pub event_id: Uuid,
    pub user_id: Uuid,
    pub conversation_id: Uuid,
    pub message_id: Uuid,
    pub model: String,
    pub provider: String,
    /// The model at the provider that answered (the chain entry's `model`), which prices the call when
    /// that entry has prices of its own. Empty for a cached reply.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub provider_model: String,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub latency_ms: i64,
    pub time_to_first_token_ms: Option<i64>,
    pub cache_hit: bool,
    pub outcome: UsageOutcome,
    /// Unix milliseconds.
    pub occurred_at_ms: i64,
    /// What the quota service charges for this call, which it does on reading the event. Absent from
    /// events whose agent settled with quota itself (older agents): those are charged already.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settlement: Option<Settlement>,
    /// The W3C `traceparent` of the call reported, so a consumer joins the event to its trace when
    /// the event shares its message (and the message's headers) with others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// The usage events one message of the usage stream carries: one (a JSON object) or several (an array).
pub fn usage_events(payload: &[u8]) -> Result<Vec<UsageEvent>, serde_json::Error> {
    match payload.iter().find(|byte| !byte.is_ascii_whitespace()) {
        Some(b'[') => serde_json::from_slice(payload),
        _ => serde_json::from_slice(payload).map(|event| vec![event]),
    }
}

/// The charge a usage event carries to the quota service: `tokens` against the budget reservation
/// `reservation_id` (which releases the rest of it), or, for a job queued without a reservation, a
/// plain charge referenced by the event's message id. Idempotent either way.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Settlement {
    pub reservation_id: Option<Uuid>,
    pub tokens: i64,
}

/// A daily spend threshold crossed, published once per threshold, scope and UTC day.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CostAlert {
    pub alert_id: Uuid,
    /// Whose spend crossed the threshold.
    pub scope: AlertScope,
    /// The user, for scope "user".
    pub user_id: Option<Uuid>,
    /// The UTC day, YYYY-MM-DD.
    pub day: String,
    pub threshold_usd: f64,
    /// Spend when the threshold was crossed.
    pub spent_usd: f64,
    /// Unix milliseconds.
    pub raised_at_ms: i64,
}

/// Whose daily spend a cost alert is about, by its lowercase name on the wire, in
/// `analytics.cost_alerts` and in the `scope` label of `parley_analytics_cost_alerts_total`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AlertScope {
    /// One user's spend.
    User,
    /// Everyone's spend.
    Global,
}

impl AlertScope {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertScope::User => "user",
            AlertScope::Global => "global",
        }
    }
}

impl TryFrom<String> for AlertScope {
    type Error = String;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        match text.as_str() {
            "user" => Ok(AlertScope::User),
            "global" => Ok(AlertScope::Global),
            _ => Err(format!("unknown alert scope {text:?}")),
        }
    }
}

/// Live progress of one assistant message, on its own core NATS subject. Gateways relay these to
/// waiting clients; the stored message stays the source of truth.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum MessageEvent {
    Delta {
        message_id: Uuid,
        index: u64,
        text: String,
    },
    Completed {
        message_id: Uuid,
        /// The reply as chat stored it, so a gateway can end a stream without reading it back. Absent
        /// from events of older agents and of a redelivered job's accounting.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reply: Option<StoredReply>,
    },
    Failed {
        message_id: Uuid,
        code: String,
        detail: String,
    },
    /// The reply starts again: the text of every delta before this one is void. Published by an agent
    /// that took over a job whose earlier attempt (an agent that died or was stopped mid-reply) had
    /// already published deltas. It takes the next index, so ids stay in order for `Last-Event-ID`.
    Reset {
        message_id: Uuid,
        index: u64,
    },
}

impl MessageEvent {
    /// The place of a delta or a reset in its reply's sequence; `None` for the end events.
    pub fn index(&self) -> Option<u64> {
        match self {
            MessageEvent::Delta { index, .. } | MessageEvent::Reset { index, .. } => Some(*index),
            MessageEvent::Completed { .. } | MessageEvent::Failed { .. } => None,
        }
    }
}

/// A completed assistant message as stored, in a `completed` event.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StoredReply {
    pub conversation_id: Uuid,
    pub content: String,
    pub model: Option<String>,
    pub input_tokens: i64,
    pub output_tokens: i64,
    /// Unix nanoseconds.
    pub created_at_ns: i64,
    pub completed_at_ns: Option<i64>,
    /// The question it answers (absent in events of earlier versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<Uuid>,
}

/// A user's tier or role changed: gateways apply them at once, ahead of the claims in tokens issued
/// before the change.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AccountChanged {
    pub user_id: Uuid,
    pub tier: String,
    pub role: String,
    /// The account was deleted: tokens issued to it stop working at once.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_outcomes_keep_their_wire_names() {
        for (outcome, name) in [
            (UsageOutcome::Completed, "completed"),
            (UsageOutcome::Failed, "failed"),
            (UsageOutcome::Summary, "summary"),
            (UsageOutcome::Title, "title"),
        ] {
            assert_eq!(serde_json::to_value(outcome).unwrap(), serde_json::json!(name));
            assert_eq!(serde_json::from_value::<UsageOutcome>(serde_json::json!(name)).unwrap(), outcome);
            assert_eq!(outcome.as_str(), name);
        }
        assert!(serde_json::from_value::<UsageOutcome>(serde_json::json!("exploded")).is_err());
    }

    #[test]
    fn a_usage_message_carries_one_event_or_an_array_of_them() {
        let event = UsageEvent {
            event_id: Uuid::now_v7(),
            user_id: Uuid::now_v7(),
            conversation_id: Uuid::nil(),
            message_id: Uuid::now_v7(),
            model: "m".to_owned(),
            provider: "p".to_owned(),
            provider_model: String::new(),
            input_tokens: 1,
            output_tokens: 2,
            latency_ms: 3,
            time_to_first_token_ms: None,
            cache_hit: false,
            outcome: UsageOutcome::Completed,
            occurred_at_ms: 4,
            settlement: Some(Settlement { reservation_id: None, tokens: 3 }),
            traceparent: None,
        };
        let one = serde_json::to_vec(&event).unwrap();
        assert_eq!(usage_events(&one).unwrap(), std::slice::from_ref(&event));
        assert!(!String::from_utf8_lossy(&one).contains("traceparent"), "absent, as older agents sent it");
        let two = format!(" \n{}", serde_json::to_string(&[&event, &event]).unwrap());
        assert_eq!(usage_events(two.as_bytes()).unwrap(), [event.clone(), event]);
        assert!(usage_events(b"[]").unwrap().is_empty());
        for unreadable in [&b""[..], b"{not json", b"[{\"event_id\": 1}]", b"7"] {
            assert!(usage_events(unreadable).is_err(), "{}", String::from_utf8_lossy(unreadable));
        }
    }
}
