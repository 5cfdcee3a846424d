-- Idempotency keys for message sends (REST Idempotency-Key, WS request_id):
-- the first request claims the key with the ids it will create, so a retry
-- finds the original messages instead of creating new ones.
CREATE TABLE idempotency_keys (
    user_id              TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    idem_key             TEXT NOT NULL,
    request_hash         TEXT NOT NULL,
    conversation_id      TEXT NOT NULL,
    user_message_id      TEXT NOT NULL,
    assistant_message_id TEXT NOT NULL,
    created_at           INTEGER NOT NULL,
    PRIMARY KEY (user_id, idem_key)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys(created_at);
CREATE INDEX messages_streaming ON messages(status, updated_at);

-- Why a reply failed, as an error code (provider_error, provider_timeout, interrupted).
ALTER TABLE messages ADD COLUMN error_code TEXT;
