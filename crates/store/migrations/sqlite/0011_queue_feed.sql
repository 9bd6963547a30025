-- The queue feed: every time a task enters or leaves the `queued` state it is stamped with the
-- next number of a counter, so that a server keeping the queue in memory reads only what
-- changed since it last looked (`queue_seq > cursor`) instead of the whole queue. Triggers do
-- the stamping so that no statement that changes a task's state can forget it.
CREATE TABLE queue_feed (
    id  INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL
);
INSERT INTO queue_feed (id, seq) VALUES (1, 0);

ALTER TABLE tasks ADD COLUMN queue_seq INTEGER NOT NULL DEFAULT 0;
CREATE INDEX tasks_by_queue_seq ON tasks(queue_seq);

CREATE TRIGGER tasks_queue_insert AFTER INSERT ON tasks WHEN NEW.state = 'queued'
BEGIN
    UPDATE queue_feed SET seq = seq + 1 WHERE id = 1;
    UPDATE tasks SET queue_seq = (SELECT seq FROM queue_feed WHERE id = 1) WHERE id = NEW.id;
END;

CREATE TRIGGER tasks_queue_change AFTER UPDATE OF state ON tasks
WHEN (NEW.state = 'queued') <> (OLD.state = 'queued')
BEGIN
    UPDATE queue_feed SET seq = seq + 1 WHERE id = 1;
    UPDATE tasks SET queue_seq = (SELECT seq FROM queue_feed WHERE id = 1) WHERE id = NEW.id;
END;

-- Tasks queued now are the feed's first entries.
UPDATE queue_feed SET seq = 1 WHERE id = 1;
UPDATE tasks SET queue_seq = 1 WHERE state = 'queued';
