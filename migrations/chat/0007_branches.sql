-- Branches: a conversation is a tree of messages. Each message follows its parent (NULL for the first);
-- editing a question or regenerating a reply adds a sibling instead of overwriting, and the
-- conversation's active branch is the path from its root to `active_leaf_id`, which listings and the
-- model's context follow. `prior_leaf_id` is the leaf a send's own statement replaced (an UPDATE's
-- RETURNING gives only new values): a send's question follows it, read under the row lock, so
-- concurrent sends into one conversation still line up one after another.
ALTER TABLE chat.messages ADD COLUMN parent_id uuid;
ALTER TABLE chat.archived_messages ADD COLUMN parent_id uuid;
CREATE OR REPLACE VIEW chat.all_messages AS
    SELECT * FROM chat.messages
    UNION ALL
    SELECT * FROM chat.archived_messages;

-- Messages stored before branches form one line, in the order they were stored.
WITH ordered AS (
    SELECT id, lag(id) OVER (PARTITION BY conversation_id ORDER BY created_at, id) AS previous
    FROM chat.all_messages)
UPDATE chat.messages m SET parent_id = ordered.previous FROM ordered WHERE m.id = ordered.id;
WITH ordered AS (
    SELECT id, lag(id) OVER (PARTITION BY conversation_id ORDER BY created_at, id) AS previous
    FROM chat.all_messages)
UPDATE chat.archived_messages m SET parent_id = ordered.previous FROM ordered WHERE m.id = ordered.id;

-- `branched`: whether any message of the conversation has a sibling. Until then the active branch is
-- every message in order, which the listings and the job context read with the plain keyset queries;
-- after it, they walk the path from the active leaf up.
ALTER TABLE chat.conversations
    ADD COLUMN active_leaf_id uuid,
    ADD COLUMN prior_leaf_id uuid,
    ADD COLUMN branched boolean NOT NULL DEFAULT false;
UPDATE chat.conversations c SET active_leaf_id = (
    SELECT id FROM chat.all_messages m WHERE m.conversation_id = c.id ORDER BY created_at DESC, id DESC LIMIT 1);

-- A message's children (siblings are the children of one parent; a branch switch walks down them).
CREATE INDEX messages_parent ON chat.messages (parent_id, created_at, id);
CREATE INDEX archived_messages_parent ON chat.archived_messages (parent_id, created_at, id);
