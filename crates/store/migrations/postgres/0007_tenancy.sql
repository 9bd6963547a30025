-- Tenancy: project settings and quotas, the audit trail, and versioned price tables that
-- attempts are metered against.

-- JSON of `ProjectSettings`; `{}` reads as the defaults.
ALTER TABLE projects ADD COLUMN settings TEXT NOT NULL DEFAULT '{}';

-- Who changed what, when, from where. `project` is NULL for cluster-wide changes.
CREATE TABLE audit (
    id      BIGSERIAL PRIMARY KEY,
    time_ms BIGINT NOT NULL,
    actor   TEXT   NOT NULL,
    address TEXT   NOT NULL,
    project TEXT,
    action  TEXT   NOT NULL,
    target  TEXT   NOT NULL,
    detail  TEXT   NOT NULL
);
CREATE INDEX audit_by_project ON audit (project, id);
CREATE INDEX audit_by_time ON audit (time_ms);

-- Every price table ever in force; a new version only when the prices change. Attempts keep
-- the version in force when they were assigned, so old work keeps its old prices. The primary
-- key is what makes concurrent servers recording a new table at once agree: one insert wins.
CREATE TABLE prices (
    version      BIGINT PRIMARY KEY,
    effective_ms BIGINT NOT NULL,
    -- JSON of `PriceTable`.
    prices       TEXT   NOT NULL
);

-- 0: assigned before any price table was recorded (costs nothing).
ALTER TABLE attempts ADD COLUMN price_version BIGINT NOT NULL DEFAULT 0;
-- Budgets sum the attempts assigned since their period began.
CREATE INDEX attempts_by_assigned ON attempts (assigned_ms);
-- Clearing a project's hold reasons runs every round for every project with limits: it reads
-- only the queued tasks that have a reason (held, or waiting out a retry's backoff).
CREATE INDEX tasks_queued_with_reason ON tasks (job_id) WHERE state = 'queued' AND reason <> '';
