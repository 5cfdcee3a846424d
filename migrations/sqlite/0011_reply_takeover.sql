-- A reply whose instance died is taken over once by a surviving instance
-- (issue #16): the claim is one conditional UPDATE that counts it here, so
-- of several sweepers exactly one regenerates it, and never a second time.
ALTER TABLE messages ADD COLUMN takeovers INTEGER NOT NULL DEFAULT 0;
