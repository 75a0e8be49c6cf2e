-- The durable record of tokens charged. Redis holds the hot per-day counters; when Redis loses them,
-- they are rebuilt from this ledger.

CREATE TABLE quota.ledger (
    reference_id text PRIMARY KEY,
    user_id      uuid NOT NULL,
    day          date NOT NULL,
    tokens       bigint NOT NULL CHECK (tokens >= 0),
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- Rebuilding one user's counter for one day.
CREATE INDEX ledger_user_day ON quota.ledger (user_id, day);
