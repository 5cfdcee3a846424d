-- Retention: a user's own limit on how long their conversations are kept
-- (NULL: the server's PALAVER_RETENTION_DAYS alone), indexes the sweeper
-- finds due rows by, and leases: which instance does a job that must run
-- on one instance at a time (the sweeper, when several share a database).
ALTER TABLE users ADD COLUMN retention_days BIGINT;

CREATE INDEX conversations_activity ON conversations(updated_at);
CREATE INDEX support_sessions_closed ON support_sessions(closed_at);

CREATE TABLE leases (
    name       TEXT PRIMARY KEY NOT NULL,
    holder     TEXT NOT NULL,
    expires_at BIGINT NOT NULL
);
