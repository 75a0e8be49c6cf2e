-- Usage events as agents report them, one row per model call, idempotent by event id.

CREATE TABLE analytics.usage_events (
    event_id          uuid PRIMARY KEY,
    user_id           uuid NOT NULL,
    conversation_id   uuid NOT NULL,
    message_id        uuid NOT NULL,
    model             text NOT NULL,
    provider          text NOT NULL,
    input_tokens      bigint NOT NULL,
    output_tokens     bigint NOT NULL,
    cost_micros       bigint NOT NULL,
    latency_ms        bigint NOT NULL,
    ttft_ms           bigint,
    cache_hit         boolean NOT NULL,
    outcome           text NOT NULL,
    occurred_at       timestamptz NOT NULL
);

-- GET /v1/usage: one user's events in a time range.
CREATE INDEX usage_events_user_time ON analytics.usage_events (user_id, occurred_at);
-- GET /v1/admin/usage: every user's events in a time range.
CREATE INDEX usage_events_time ON analytics.usage_events (occurred_at);
