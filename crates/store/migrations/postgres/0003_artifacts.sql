-- Outputs that attempts kept, by path in the task's workspace; the bytes live in the blob store.
CREATE TABLE artifacts (
    id         BIGSERIAL PRIMARY KEY,
    job_id     BIGINT NOT NULL,
    task_id    BIGINT NOT NULL,
    attempt_id BIGINT NOT NULL,
    attempt    INTEGER NOT NULL,
    path       TEXT   NOT NULL,
    size       BIGINT NOT NULL,
    digest     TEXT   NOT NULL,
    created_ms BIGINT NOT NULL
);
CREATE INDEX artifacts_by_job ON artifacts (job_id, task_id, path);
