-- Conversations, messages, the AI job outbox and idempotency keys.

CREATE TABLE chat.conversations (
    id            uuid PRIMARY KEY,
    user_id       uuid NOT NULL,
    title         text,
    model         text NOT NULL,
    system_prompt text,
    version       bigint NOT NULL DEFAULT 1,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- GET /v1/conversations: a user's conversations, most recently updated first (keyset pagination).
CREATE INDEX conversations_user_updated ON chat.conversations (user_id, updated_at DESC, id DESC);

CREATE TABLE chat.messages (
    id              uuid PRIMARY KEY,
    conversation_id uuid NOT NULL REFERENCES chat.conversations (id) ON DELETE CASCADE,
    user_id         uuid NOT NULL,
    role            text NOT NULL CHECK (role IN ('user', 'assistant', 'system')),
    content         text NOT NULL DEFAULT '',
    status          text NOT NULL CHECK (status IN ('pending', 'streaming', 'completed', 'failed')),
    model           text,
    input_tokens    bigint,
    output_tokens   bigint,
    error_code      text,
    error_detail    text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    completed_at    timestamptz
);

-- GET /v1/conversations/{id}/messages (oldest first) and the agent's recent history. Message ids are
-- UUIDv7, so (created_at, id) is a stable total order for keyset pagination.
CREATE INDEX messages_conversation_created ON chat.messages (conversation_id, created_at, id);

-- Jobs written in the same transaction as the messages they answer; the relay publishes them to
-- JetStream and stamps published_at.
CREATE TABLE chat.outbox (
    id           bigserial PRIMARY KEY,
    job_id       uuid NOT NULL UNIQUE,
    subject      text NOT NULL,
    payload      jsonb NOT NULL,
    traceparent  text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz
);

-- The relay's scan: only unpublished rows, oldest first.
CREATE INDEX outbox_unpublished ON chat.outbox (id) WHERE published_at IS NULL;

-- Idempotency-Key on sends, scoped per user and honoured for 24 hours.
CREATE TABLE chat.idempotency_keys (
    user_id              uuid NOT NULL,
    key                  text NOT NULL,
    conversation_id      uuid NOT NULL,
    user_message_id      uuid NOT NULL,
    assistant_message_id uuid NOT NULL,
    created_at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, key)
);
