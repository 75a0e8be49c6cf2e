-- Usage events partitioned by month, daily rollups per user and model, and cost alerts.

-- Events by month of occurred_at: a month is dropped or detached as one table, and a query over a
-- time range only opens the months it covers. The primary key carries the partition key; an event
-- keeps its occurred_at across redeliveries, so (event_id, occurred_at) still makes ingestion
-- idempotent by event id.
ALTER TABLE analytics.usage_events RENAME TO usage_events_unpartitioned;
ALTER INDEX analytics.usage_events_user_time RENAME TO usage_events_unpartitioned_user_time;
ALTER INDEX analytics.usage_events_time RENAME TO usage_events_unpartitioned_time;

CREATE TABLE analytics.usage_events (
    event_id          uuid NOT NULL,
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
    occurred_at       timestamptz NOT NULL,
    PRIMARY KEY (event_id, occurred_at)
) PARTITION BY RANGE (occurred_at);

-- Catches an event whose month has no partition (a clock far off); normally empty.
CREATE TABLE analytics.usage_events_default PARTITION OF analytics.usage_events DEFAULT;

-- Usage reports read raw events only for the partial days at the ends of a range (whole days come
-- from the rollup): one user's, or everyone's.
CREATE INDEX usage_events_user_time ON analytics.usage_events (user_id, occurred_at);
CREATE INDEX usage_events_time ON analytics.usage_events (occurred_at);

-- Creates the month partition that holds `at`, unless it exists or the default partition already
-- holds rows of that month (then they stay there). Safe to call concurrently.
CREATE FUNCTION analytics.ensure_usage_partition(at timestamptz) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    month_start timestamptz := date_trunc('month', at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    month_end   timestamptz := (date_trunc('month', at AT TIME ZONE 'UTC') + interval '1 month') AT TIME ZONE 'UTC';
    name        text := 'usage_events_' || to_char(at AT TIME ZONE 'UTC', 'YYYY_MM');
BEGIN
    IF to_regclass('analytics.' || name) IS NOT NULL THEN
        RETURN;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('analytics.usage_events partitions'));
    IF to_regclass('analytics.' || name) IS NOT NULL THEN
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM analytics.usage_events_default
               WHERE occurred_at >= month_start AND occurred_at < month_end) THEN
        RETURN;
    END IF;
    EXECUTE format('CREATE TABLE analytics.%I PARTITION OF analytics.usage_events FOR VALUES FROM (%L) TO (%L)',
                   name, month_start, month_end);
END
$$;

DO $$
DECLARE
    month timestamptz;
BEGIN
    FOR month IN
        SELECT DISTINCT date_trunc('month', occurred_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
        FROM analytics.usage_events_unpartitioned
        UNION SELECT now() UNION SELECT now() + interval '1 month'
    LOOP
        PERFORM analytics.ensure_usage_partition(month);
    END LOOP;
END
$$;

INSERT INTO analytics.usage_events SELECT * FROM analytics.usage_events_unpartitioned;
DROP TABLE analytics.usage_events_unpartitioned;

-- What usage reports read for whole days: one row per UTC day, user and model, kept up to date in the
-- same transaction that stores each event.
CREATE TABLE analytics.usage_daily (
    day           date NOT NULL,
    user_id       uuid NOT NULL,
    model         text NOT NULL,
    requests      bigint NOT NULL,
    input_tokens  bigint NOT NULL,
    output_tokens bigint NOT NULL,
    cost_micros   bigint NOT NULL,
    cache_hits    bigint NOT NULL,
    failures      bigint NOT NULL,
    -- GET /v1/admin/usage: every user's days in a range (and the upsert per event).
    PRIMARY KEY (day, user_id, model)
);

-- GET /v1/usage: one user's days in a range.
CREATE INDEX usage_daily_user_day ON analytics.usage_daily (user_id, day);

INSERT INTO analytics.usage_daily
SELECT (occurred_at AT TIME ZONE 'UTC')::date, user_id, model, COUNT(*), SUM(input_tokens), SUM(output_tokens),
       SUM(cost_micros), COUNT(*) FILTER (WHERE cache_hit), COUNT(*) FILTER (WHERE outcome <> 'completed')
FROM analytics.usage_events
GROUP BY 1, 2, 3;

-- Everyone's spend per UTC day: the global alert thresholds are checked against it.
CREATE TABLE analytics.spend_daily (
    day         date PRIMARY KEY,
    cost_micros bigint NOT NULL
);

INSERT INTO analytics.spend_daily
SELECT day, SUM(cost_micros) FROM analytics.usage_daily GROUP BY day;

-- Thresholds crossed: one row per day, scope, user (the nil UUID for the global scope) and threshold,
-- so each alert is raised once. published_at is set once the alert is on NATS.
CREATE TABLE analytics.cost_alerts (
    day              date NOT NULL,
    scope            text NOT NULL CHECK (scope IN ('user', 'global')),
    user_id          uuid NOT NULL,
    threshold_micros bigint NOT NULL,
    alert_id         uuid NOT NULL UNIQUE,
    spent_micros     bigint NOT NULL,
    raised_at        timestamptz NOT NULL DEFAULT now(),
    published_at     timestamptz,
    PRIMARY KEY (day, scope, user_id, threshold_micros)
);

-- The publisher's scan: alerts not yet on NATS.
CREATE INDEX cost_alerts_unpublished ON analytics.cost_alerts (raised_at) WHERE published_at IS NULL;
