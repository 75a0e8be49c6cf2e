-- Full-text search over sealed content through a blind index (chat/src/search.rs): each user's search
-- key, wrapped by a key-encryption key like a data key, and for each message and each titled
-- conversation the keyed hashes of its words with their positions. PostgreSQL matches and ranks terms
-- it cannot read; the words themselves are never stored in clear.
CREATE TABLE chat.search_keys (
    user_id uuid PRIMARY KEY,
    wrapped bytea NOT NULL
);

-- item_id is a message's id, or, for a conversation's title, the conversation's own id. The rows go
-- with their conversation (deleted, erased or past retention); archiving a conversation leaves them.
CREATE TABLE chat.search_terms (
    item_id uuid PRIMARY KEY,
    conversation_id uuid NOT NULL REFERENCES chat.conversations (id) ON DELETE CASCADE,
    user_id uuid NOT NULL,
    terms tsvector NOT NULL
);
CREATE INDEX search_terms_conversation ON chat.search_terms (conversation_id);
-- Blind terms differ from user to user, so this one index serves every user's searches.
CREATE INDEX search_terms_terms ON chat.search_terms USING gin (terms);
