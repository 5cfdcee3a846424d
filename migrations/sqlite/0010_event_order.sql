-- Support events in the order they commit (issue #16). An event's id is
-- given out while it is the only event being written (one writer on SQLite,
-- an advisory lock on PostgreSQL), so once an id is visible every lower id is
-- committed or abandoned: instances hold a live event back until the ones
-- before it are known, and `?since=` replays never skip one. The agent that
-- held the session is kept with the event, so one read back from the log is
-- routed like the live one.
ALTER TABLE support_events ADD COLUMN agent_id TEXT;
