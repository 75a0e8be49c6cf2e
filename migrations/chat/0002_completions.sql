-- Stateless completions (the OpenAI-compatible API) are stored as conversations of kind 'completion':
-- they go through the same outbox, agents and accounting as chat messages, but are not listed.

ALTER TABLE chat.conversations
    ADD COLUMN kind text NOT NULL DEFAULT 'chat' CHECK (kind IN ('chat', 'completion'));

-- GET /v1/conversations lists only chats: the index covers exactly those rows.
DROP INDEX chat.conversations_user_updated;
CREATE INDEX conversations_user_updated ON chat.conversations (user_id, updated_at DESC, id DESC)
    WHERE kind = 'chat';
