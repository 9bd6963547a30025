-- Retention: ended jobs past their project's retention are deleted, and blobs nothing points to
-- any more are garbage-collected.

-- The blobs a job's plan names (input uploads, shipped image archives): the references that
-- otherwise live only inside the tasks' plan text.
CREATE TABLE job_blobs (
    job_id INTEGER NOT NULL,
    digest TEXT    NOT NULL,
    PRIMARY KEY (job_id, digest)
) WITHOUT ROWID;
CREATE INDEX job_blobs_by_digest ON job_blobs(digest);

-- Blobs that lost their last reference, since when, and whether their deletion has begun
-- (`deleting`: uploads and references of the digest are refused until the file is gone).
CREATE TABLE unreferenced_blobs (
    digest   TEXT    PRIMARY KEY,
    since_ms INTEGER NOT NULL,
    deleting INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX unreferenced_blobs_by_since ON unreferenced_blobs(since_ms);

-- Finding the jobs past retention reads ended jobs by project and end.
CREATE INDEX jobs_by_project_ended ON jobs(project, ended_ms) WHERE ended_ms IS NOT NULL;

-- Jobs stored before this migration get their references from their plans.
INSERT OR IGNORE INTO job_blobs (job_id, digest)
SELECT job_id, json_extract(plan, '$.image_blob') FROM tasks
WHERE json_extract(plan, '$.image_blob') IS NOT NULL;
INSERT OR IGNORE INTO job_blobs (job_id, digest)
SELECT t.job_id, json_extract(i.value, '$.source.blob.digest') FROM tasks t, json_each(t.plan, '$.inputs') i
WHERE json_extract(i.value, '$.source.blob.digest') IS NOT NULL;
