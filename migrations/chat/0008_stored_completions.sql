-- Completions their clients asked to keep (OpenAI's `store: true`): the `chat.completion` object as
-- returned and the request's messages, both sealed with the completion's own data key (wrapped like a
-- conversation's), and the metadata the client gave, kept readable so that a listing can filter on it.
CREATE TABLE chat.stored_completions (
    id uuid PRIMARY KEY,
    user_id uuid NOT NULL,
    model text NOT NULL,
    metadata jsonb NOT NULL DEFAULT '{}'::jsonb,
    data_key bytea NOT NULL,
    completion text NOT NULL,
    messages text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- A user's listing, in id order (ids are UUIDv7: the order they were made).
CREATE INDEX stored_completions_by_user ON chat.stored_completions (user_id, id);
