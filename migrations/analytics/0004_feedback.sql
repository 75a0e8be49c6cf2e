-- Ratings of the model's replies: thumbs up or down with an optional comment, one per reply, set,
-- changed and removed by the user the reply was for. Satisfaction per model is read from here, and
-- admins export the rows. Comments are stored in clear, like the audit log: operators read them; an
-- account's deletion erases its rows.
CREATE TABLE analytics.feedback (
    message_id uuid PRIMARY KEY,
    user_id uuid NOT NULL,
    conversation_id uuid NOT NULL,
    model text NOT NULL,
    rating text NOT NULL CHECK (rating IN ('up', 'down')),
    comment text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
-- The export: newest change first, keyset-paged.
CREATE INDEX feedback_updated ON analytics.feedback (updated_at DESC, message_id DESC);
CREATE INDEX feedback_user ON analytics.feedback (user_id);
