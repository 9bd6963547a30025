-- The sequence number of the last output report stored for each attempt. An agent numbers its
-- reports in order and sends again what was not acknowledged (after a reconnect, or from its
-- state log after a restart): a report at or below this number was stored already.
ALTER TABLE attempts ADD COLUMN output_seq INTEGER NOT NULL DEFAULT 0;
