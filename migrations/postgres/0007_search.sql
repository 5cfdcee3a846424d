-- Literal search over message text: a trigram GIN index on the lowercased
-- content serves `lower(content) LIKE '%…%'`, and the store checks each
-- candidate exactly. The extension lives in `public`, so every schema of
-- the database (tests run one per test) finds the same operator class.
CREATE EXTENSION IF NOT EXISTS pg_trgm WITH SCHEMA public;

CREATE INDEX messages_content_trgm ON messages USING gin (lower(content) public.gin_trgm_ops);

-- Agent search joins support messages to their session.
CREATE INDEX support_sessions_conversation ON support_sessions(conversation_id);
