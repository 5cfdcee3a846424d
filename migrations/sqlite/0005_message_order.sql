-- Messages of a conversation are ordered by a sequence number given out in
-- the transaction that stores them (the conversation's row is the counter),
-- so the stored order is the order writers committed in: a reply's context
-- is exactly the messages up to the one it answers, whatever ran beside it.
ALTER TABLE conversations ADD COLUMN last_seq INTEGER NOT NULL DEFAULT 0;
ALTER TABLE messages ADD COLUMN seq INTEGER NOT NULL DEFAULT 0;

UPDATE messages SET seq = ordered.n
FROM (SELECT id, ROW_NUMBER() OVER (PARTITION BY conversation_id ORDER BY created_at, id) AS n FROM messages) AS ordered
WHERE ordered.id = messages.id;

UPDATE conversations SET last_seq = COALESCE((SELECT MAX(m.seq) FROM messages m WHERE m.conversation_id = conversations.id), 0);

CREATE UNIQUE INDEX messages_conversation_seq ON messages(conversation_id, seq);
DROP INDEX messages_conversation_order;
