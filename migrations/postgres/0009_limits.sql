-- Token budgets and rate limits (issue #11). A budget is a number of tokens
-- per UTC day or month; NULL means none. `rpm` is a key's requests per minute.
ALTER TABLE users ADD COLUMN token_budget BIGINT;
ALTER TABLE users ADD COLUMN budget_period TEXT;
ALTER TABLE api_keys ADD COLUMN token_budget BIGINT;
ALTER TABLE api_keys ADD COLUMN budget_period TEXT;
ALTER TABLE api_keys ADD COLUMN rpm BIGINT;

-- What a budgeted subject (`user:<id>`, `key:<id>`, `desk`) has spent
-- (`used`, settled) and holds (`reserved`, requests under way) in a period,
-- when the database keeps the budgets (no REDIS_URL). A reservation is
-- checked and taken by one conditional UPDATE of this row, so concurrent
-- requests on any number of instances never overdraw it.
CREATE TABLE quota_counters (
    subject  TEXT NOT NULL,
    period   TEXT NOT NULL,
    used     BIGINT NOT NULL DEFAULT 0,
    reserved BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (subject, period)
);

-- Reservations under way; one whose request died is given back once it
-- expires.
CREATE TABLE quota_reservations (
    id         TEXT PRIMARY KEY,
    subject    TEXT NOT NULL,
    period     TEXT NOT NULL,
    tokens     BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX quota_reservations_expiry ON quota_reservations (subject, expires_at);

-- Settled usage per subject, period (day and month) and model, for the
-- usage endpoints; written by every chat path, budgeted or not.
CREATE TABLE quota_usage (
    subject           TEXT NOT NULL,
    period            TEXT NOT NULL,
    model             TEXT NOT NULL,
    requests          BIGINT NOT NULL DEFAULT 0,
    prompt_tokens     BIGINT NOT NULL DEFAULT 0,
    completion_tokens BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (subject, period, model)
);
