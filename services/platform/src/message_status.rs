//! Where a message stands. A user's message is stored completed; a reply is created pending, may be
//! streaming, and ends completed or failed. Stored and carried by its lowercase name: the database's
//! `status` column, the gRPC `Message.status` field, the API's `status`.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageStatus {
    Pending,
    Streaming,
    Completed,
    Failed,
}

impl MessageStatus {
    pub const ALL: [MessageStatus; 4] =
        [MessageStatus::Pending, MessageStatus::Streaming, MessageStatus::Completed, MessageStatus::Failed];

    pub fn as_str(self) -> &'static str {
        match self {
            MessageStatus::Pending => "pending",
            MessageStatus::Streaming => "streaming",
            MessageStatus::Completed => "completed",
            MessageStatus::Failed => "failed",
        }
    }

    /// The status named `text`; `None` for a name this version does not know.
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|status| status.as_str() == text)
    }

    /// A finished message changes no more.
    pub fn is_finished(self) -> bool {
        matches!(self, MessageStatus::Completed | MessageStatus::Failed)
    }
}

/// Whether the status named `text` is a finished one (an unknown name is not).
pub fn is_finished(text: &str) -> bool {
    MessageStatus::parse(text).is_some_and(MessageStatus::is_finished)
}

impl TryFrom<String> for MessageStatus {
    type Error = String;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        Self::parse(&text).ok_or_else(|| format!("unknown message status {text:?}"))
    }
}

impl std::fmt::Display for MessageStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_only_completed_and_failed_are_finished() {
        for status in MessageStatus::ALL {
            assert_eq!(MessageStatus::parse(status.as_str()), Some(status));
            assert_eq!(serde_json::to_value(status).unwrap(), status.as_str());
        }
        let finished: Vec<_> = MessageStatus::ALL.into_iter().filter(|status| status.is_finished()).collect();
        assert_eq!(finished, [MessageStatus::Completed, MessageStatus::Failed]);
        assert!(!is_finished("archived") && is_finished("failed"));
    }
}
