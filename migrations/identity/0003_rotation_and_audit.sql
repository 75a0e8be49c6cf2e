-- Signing-key rotation: a key is published as soon as it exists but signs only from activates_at, so
-- every gateway has fetched it before the first token it signs arrives. An older key stays published
-- until retired_at, after the last token it signed has expired.
ALTER TABLE identity.signing_keys ADD COLUMN activates_at timestamptz NOT NULL DEFAULT now();

-- Security events: who did what, when, from where.
CREATE TABLE identity.audit_log (
    id         uuid PRIMARY KEY,
    at         timestamptz NOT NULL DEFAULT now(),
    event      text NOT NULL,
    -- The account the event is about (NULL when unknown, e.g. a login for an unregistered email).
    user_id    uuid,
    -- The account that acted, when it is not the subject (an admin changing a tier).
    actor_id   uuid,
    -- The email the event concerned, lowercased (failed logins are counted by it).
    email      text,
    client_ip  text,
    detail     jsonb NOT NULL DEFAULT '{}'
);

-- Counting recent failed logins for one account (brute-force protection).
CREATE INDEX audit_log_event_email_at ON identity.audit_log (event, email, at);
-- Reading one account's history.
CREATE INDEX audit_log_user_at ON identity.audit_log (user_id, at);
