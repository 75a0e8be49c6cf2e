//! Where a message stands. A user's message is stored completed; a reply is created pending, may be
//! streaming, and ends completed or failed. Stored by its lowercase name (the database's `status`
//! column, the API's `status`), carried between services as the `MessageState` enum of the chat
//! contract: both conversions are exhaustive matches, so a state added on either side and not handled
//! is a compile error.

use parley_proto::chat::v1 as chat_pb;
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

impl From<MessageStatus> for chat_pb::MessageState {
    fn from(status: MessageStatus) -> Self {
        match status {
            MessageStatus::Pending => chat_pb::MessageState::Pending,
            MessageStatus::Streaming => chat_pb::MessageState::Streaming,
            MessageStatus::Completed => chat_pb::MessageState::Completed,
            MessageStatus::Failed => chat_pb::MessageState::Failed,
        }
    }
}

impl MessageStatus {
    /// The state a chat contract's message carries: `state`, or from a chat service of the previous
    /// release, which sends only the name in `status`. `None` when neither says.
    pub fn of(message: &chat_pb::Message) -> Option<Self> {
        match message.state() {
            chat_pb::MessageState::Pending => Some(MessageStatus::Pending),
            chat_pb::MessageState::Streaming => Some(MessageStatus::Streaming),
            chat_pb::MessageState::Completed => Some(MessageStatus::Completed),
            chat_pb::MessageState::Failed => Some(MessageStatus::Failed),
            chat_pb::MessageState::Unspecified => Self::parse(&message.status),
        }
    }
}

/// Whether a chat contract's message is finished (one in a state this version does not know is not).
pub fn is_finished(message: &chat_pb::Message) -> bool {
    MessageStatus::of(message).is_some_and(MessageStatus::is_finished)
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
    }

    #[test]
    fn the_contract_carries_the_state_and_older_senders_the_name() {
        for status in MessageStatus::ALL {
            let message = chat_pb::Message { state: chat_pb::MessageState::from(status).into(), ..Default::default() };
            assert_eq!(MessageStatus::of(&message), Some(status));
            let older = chat_pb::Message { status: status.as_str().to_owned(), ..Default::default() };
            assert_eq!(MessageStatus::of(&older), Some(status));
            assert_eq!(is_finished(&message), status.is_finished());
        }
        assert_eq!(MessageStatus::of(&chat_pb::Message { status: "archived".to_owned(), ..Default::default() }), None);
        assert!(!is_finished(&chat_pb::Message::default()));
    }
}
