-- Running token totals per user and period, ready for quotas. A period is a
-- UTC day (`2026-11-22`) or month (`2026-11`); each reply adds to both.
CREATE TABLE user_usage (
    user_id           TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    period            TEXT NOT NULL,
    prompt_tokens     INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    updated_at        INTEGER NOT NULL,
    PRIMARY KEY (user_id, period)
);
