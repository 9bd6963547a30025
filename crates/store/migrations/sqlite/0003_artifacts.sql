-- Outputs that attempts kept, by path in the task's workspace; the bytes live in the blob store.
CREATE TABLE artifacts (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id     INTEGER NOT NULL,
    task_id    INTEGER NOT NULL,
    attempt_id INTEGER NOT NULL,
    attempt    INTEGER NOT NULL,
    path       TEXT    NOT NULL,
    size       INTEGER NOT NULL,
    digest     TEXT    NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE INDEX artifacts_by_job ON artifacts(job_id, task_id, path);
