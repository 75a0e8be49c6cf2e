-- Private signing keys are stored sealed (AES-256-GCM under PARLEY_SECRETS_KEY). Keys written before
-- this column existed are sealed by the user service when it starts.
ALTER TABLE identity.signing_keys ADD COLUMN private_key_sealed boolean NOT NULL DEFAULT false;
