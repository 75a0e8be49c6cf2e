-- A running summary of a conversation's earlier messages, kept by agents when a thread no longer fits
-- its model's context window, and the position (created_at, id) of the last message it covers.

ALTER TABLE chat.conversations
    ADD COLUMN summary text,
    ADD COLUMN summary_until_at timestamptz,
    ADD COLUMN summary_until_id uuid;
