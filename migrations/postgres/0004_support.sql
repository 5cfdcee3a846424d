-- Support desk: sessions of website visitors, their live queue, and an event
-- log that sockets replay from (`?since=<seq>`). A session's messages are
-- ordinary messages of a conversation owned by the built-in support user,
-- so AI replies stream, resume and recover like every other reply.

INSERT INTO users (id, email, username, username_key, display_name, password_hash, role, disabled_at, created_at, updated_at)
VALUES ('00000000-0000-0000-0000-00000000500a', NULL, NULL, NULL, 'Palaver support desk', '!', 'user', 0, 0, 0);

CREATE TABLE support_sessions (
    id                TEXT PRIMARY KEY NOT NULL,
    conversation_id   TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    client_name       TEXT NOT NULL,
    client_email      TEXT NOT NULL,
    client_phone      TEXT,
    client_token_hash TEXT NOT NULL UNIQUE,
    status            TEXT NOT NULL,
    queued_at         BIGINT,
    assigned_agent    TEXT REFERENCES users(id) ON DELETE SET NULL,
    claimed_at        BIGINT,
    last_wait_ms      BIGINT,
    closed_at         BIGINT,
    created_at        BIGINT NOT NULL,
    updated_at        BIGINT NOT NULL
);
CREATE INDEX support_sessions_queue ON support_sessions(status, queued_at);
CREATE INDEX support_sessions_agent ON support_sessions(assigned_agent, status);

CREATE TABLE support_events (
    seq        BIGSERIAL PRIMARY KEY,
    session_id TEXT NOT NULL,
    kind       TEXT NOT NULL,
    payload    TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX support_events_session ON support_events(session_id, seq);
