-- Envelope encryption of what users write: each conversation's data key, wrapped by a key-encryption
-- key from configuration (PARLEY_CONTENT_KEYS). Message content, the title and the running summary are
-- stored sealed with it, in the columns they always were (platform::envelope). NULL for a conversation
-- created before: it gets one when it is next written to.
ALTER TABLE chat.conversations ADD COLUMN data_key bytea;
