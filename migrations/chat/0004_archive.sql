-- Cold storage for idle conversations. `parley archive` moves the messages of conversations idle for
-- N days from chat.messages to chat.archived_messages, so the table every send and live listing
-- touches (and its indexes) holds only active conversations. Reads go through chat.all_messages and
-- do not care where a message lives. On a large installation the archive table can be moved to a
-- cheaper tablespace (ALTER TABLE ... SET TABLESPACE) without any change to Parley.

ALTER TABLE chat.conversations ADD COLUMN archived_at timestamptz;

-- `parley archive`'s scan: conversations not archived since their last activity, oldest first.
CREATE INDEX conversations_archivable ON chat.conversations (updated_at) WHERE archived_at IS NULL;

-- Same columns in the same order as chat.messages (the move is INSERT ... SELECT *): a migration that
-- adds a column to one adds it to the other.
CREATE TABLE chat.archived_messages (LIKE chat.messages INCLUDING DEFAULTS INCLUDING CONSTRAINTS);
ALTER TABLE chat.archived_messages
    ADD PRIMARY KEY (id),
    ADD FOREIGN KEY (conversation_id) REFERENCES chat.conversations (id) ON DELETE CASCADE;

-- The same access pattern as messages_conversation_created: a conversation's messages in order.
CREATE INDEX archived_messages_conversation_created ON chat.archived_messages (conversation_id, created_at, id);

-- Every message, wherever it lives. A keyset query on it becomes a merge of two index scans.
CREATE VIEW chat.all_messages AS
    SELECT * FROM chat.messages
    UNION ALL
    SELECT * FROM chat.archived_messages;
