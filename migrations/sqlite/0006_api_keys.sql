-- API keys (`pk_…`): only a SHA-256 of the key is kept; `prefix` is the
-- start shown in lists. `models` is a JSON array of allowed model ids, or
-- NULL for all. Revoking deletes the row, so a key stops working at once on
-- every instance (each request reads it).
CREATE TABLE api_keys (
    id           TEXT PRIMARY KEY,
    user_id      TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    name         TEXT NOT NULL,
    prefix       TEXT NOT NULL,
    key_hash     TEXT NOT NULL UNIQUE,
    models       TEXT,
    created_at   INTEGER NOT NULL,
    expires_at   INTEGER,
    last_used_at INTEGER
);
CREATE INDEX api_keys_user ON api_keys (user_id, created_at);

-- Gateway usage per key (or '' for calls made with an access token), owner,
-- model and UTC day; added to in batches, never on a request's hot path.
CREATE TABLE api_usage (
    key_id            TEXT NOT NULL,
    user_id           TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    model             TEXT NOT NULL,
    day               TEXT NOT NULL,
    requests          INTEGER NOT NULL DEFAULT 0,
    prompt_tokens     INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, user_id, model, day)
);
