-- Output is stored in chunks: one row per batch of lines an agent shipped, instead of one row
-- per line. A line's id is `chunk id << 16 | its index in the chunk`.
CREATE TABLE log_chunks (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id     INTEGER NOT NULL,
    task_id    INTEGER NOT NULL,
    attempt_id INTEGER NOT NULL,
    attempt    INTEGER NOT NULL,
    -- One head per line, space-separated: the step, `o` (stdout) or `e` (stderr), the length.
    heads      TEXT    NOT NULL,
    -- The lines' bytes, back to back.
    data       BLOB    NOT NULL
);
CREATE INDEX log_chunks_by_job ON log_chunks(job_id, id);
CREATE INDEX log_chunks_by_attempt ON log_chunks(attempt_id, id);

-- Lines stored before become chunks of one line each, in their order.
INSERT INTO log_chunks (id, job_id, task_id, attempt_id, attempt, heads, data)
SELECT id, job_id, task_id, attempt_id, attempt,
       step || CASE WHEN stderr THEN 'e' ELSE 'o' END || length(CAST(data AS BLOB)), CAST(data AS BLOB)
FROM log_lines ORDER BY id;
DROP TABLE log_lines;
