-- Accounts, credentials, refresh tokens and the keys that sign access tokens.

CREATE TABLE identity.users (
    id            uuid PRIMARY KEY,
    email         text NOT NULL,
    display_name  text,
    password_hash text NOT NULL,
    role          text NOT NULL DEFAULT 'user' CHECK (role IN ('user', 'admin')),
    tier          text NOT NULL DEFAULT 'free',
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- Emails are unique regardless of case; login looks them up the same way.
CREATE UNIQUE INDEX users_email_lower_key ON identity.users (lower(email));

-- Refresh tokens are stored only as SHA-256 hashes. A family is the chain of tokens issued from one
-- login; presenting a rotated token revokes the whole family.
CREATE TABLE identity.refresh_tokens (
    id          uuid PRIMARY KEY,
    user_id     uuid NOT NULL REFERENCES identity.users (id) ON DELETE CASCADE,
    family_id   uuid NOT NULL,
    token_hash  bytea NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    rotated_at  timestamptz,
    revoked_at  timestamptz
);

CREATE INDEX refresh_tokens_family ON identity.refresh_tokens (family_id);

-- Ed25519 keys for access tokens, named by kid. The newest active key signs; every key not yet
-- retired is published in the JWKS so tokens it signed keep verifying.
CREATE TABLE identity.signing_keys (
    kid          text PRIMARY KEY,
    algorithm    text NOT NULL,
    private_key  bytea NOT NULL,
    public_key   bytea NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    retired_at   timestamptz
);
