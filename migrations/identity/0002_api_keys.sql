-- API keys (`pk_...`): shown once at creation, stored only as SHA-256 (they are 256-bit random, so a
-- slow hash buys nothing), revocable at any time.

CREATE TABLE identity.api_keys (
    id           uuid PRIMARY KEY,
    user_id      uuid NOT NULL REFERENCES identity.users (id) ON DELETE CASCADE,
    name         text NOT NULL,
    prefix       text NOT NULL,
    key_hash     bytea NOT NULL UNIQUE,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    revoked_at   timestamptz
);

-- GET /v1/api-keys: a user's keys, newest first.
CREATE INDEX api_keys_user_created ON identity.api_keys (user_id, created_at DESC);
