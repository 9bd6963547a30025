-- The queue feed: every time a task enters or leaves the `queued` state it is stamped with the
-- id of the transaction that did it, so that a server keeping the queue in memory reads only
-- what changed since it last looked instead of the whole queue. Transaction ids let a reader
-- skip nothing that commits late: it resumes from the oldest transaction still running when
-- it last read (`pg_snapshot_xmin`), so a row stamped by a transaction that was in flight then
-- is read again, never missed. A trigger does the stamping so that no statement that changes a
-- task's state can forget it.
ALTER TABLE tasks ADD COLUMN queue_xid xid8;
CREATE INDEX tasks_by_queue_xid ON tasks (queue_xid);

CREATE FUNCTION tasks_stamp_queue() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF NEW.state = 'queued' THEN
            NEW.queue_xid := pg_current_xact_id();
        END IF;
    ELSIF (NEW.state = 'queued') IS DISTINCT FROM (OLD.state = 'queued') THEN
        NEW.queue_xid := pg_current_xact_id();
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER tasks_queue_stamp BEFORE INSERT OR UPDATE OF state ON tasks
FOR EACH ROW EXECUTE FUNCTION tasks_stamp_queue();

UPDATE tasks SET queue_xid = pg_current_xact_id() WHERE state = 'queued';
