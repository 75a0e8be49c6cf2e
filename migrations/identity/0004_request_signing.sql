-- Optional HMAC request signing per API key. The signing secret must be readable to verify signatures,
-- so it is stored encrypted (AES-256-GCM under PARLEY_SECRETS_KEY), never in clear.
ALTER TABLE identity.api_keys
    ADD COLUMN require_signature boolean NOT NULL DEFAULT false,
    ADD COLUMN signing_secret_sealed bytea;
