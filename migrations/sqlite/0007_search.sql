-- Literal search over message text. An FTS5 table with the trigram
-- tokenizer indexes every message's content (external content: the text
-- itself stays in `messages`); triggers keep it in step with every insert,
-- update (replies are written while they stream) and delete, cascaded ones
-- included. The index is keyed by the messages' rowid, which only VACUUM
-- renumbers: Palaver never runs it; after a manual VACUUM run
-- INSERT INTO messages_fts(messages_fts) VALUES ('rebuild').
CREATE VIRTUAL TABLE messages_fts USING fts5(
    content,
    content = 'messages',
    content_rowid = 'rowid',
    tokenize = 'trigram'
);

INSERT INTO messages_fts(messages_fts) VALUES ('rebuild');

CREATE TRIGGER messages_fts_insert AFTER INSERT ON messages BEGIN
    INSERT INTO messages_fts(rowid, content) VALUES (new.rowid, new.content);
END;

CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages BEGIN
    INSERT INTO messages_fts(messages_fts, rowid, content) VALUES ('delete', old.rowid, old.content);
END;

CREATE TRIGGER messages_fts_update AFTER UPDATE OF content ON messages BEGIN
    INSERT INTO messages_fts(messages_fts, rowid, content) VALUES ('delete', old.rowid, old.content);
    INSERT INTO messages_fts(rowid, content) VALUES (new.rowid, new.content);
END;

-- Agent search joins support messages to their session.
CREATE INDEX support_sessions_conversation ON support_sessions(conversation_id);
