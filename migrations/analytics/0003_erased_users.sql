-- Accounts that were deleted: their usage was moved to the anonymous account (the nil UUID), and an
-- event of theirs that arrives later (a reply that was still generating) is stored anonymised too.
-- The id is all that is kept; it names nobody once the account is gone.
CREATE TABLE analytics.erased_users (
    user_id   uuid PRIMARY KEY,
    erased_at timestamptz NOT NULL DEFAULT now()
);
