-- Identity and access: projects, API keys, join tokens, node credentials, and which projects
-- hold which blobs. Secrets are never stored, only the SHA-256 of their secret part.

CREATE TABLE projects (
    name       TEXT   PRIMARY KEY,
    -- 0 for `default` and for projects that existed before this migration but had no job.
    created_ms BIGINT NOT NULL
);
INSERT INTO projects (name, created_ms) VALUES ('default', 0);
-- An upgraded database keeps working: every project its jobs or secrets name exists, created
-- when its first job was.
INSERT INTO projects (name, created_ms) SELECT project, MIN(created_ms) FROM jobs GROUP BY project
    ON CONFLICT (name) DO NOTHING;
INSERT INTO projects (name, created_ms) SELECT DISTINCT project, 0 FROM secrets
    ON CONFLICT (name) DO NOTHING;

CREATE TABLE api_keys (
    id            TEXT   PRIMARY KEY,
    secret_sha256 BYTEA  NOT NULL,
    -- NULL exactly for operator keys, which reach every project.
    project       TEXT,
    -- viewer | submitter | admin | operator
    role          TEXT   NOT NULL,
    name          TEXT   NOT NULL,
    created_ms    BIGINT NOT NULL,
    expires_ms    BIGINT,
    revoked_ms    BIGINT,
    -- A key id, or `bootstrap`.
    created_by    TEXT   NOT NULL
);
CREATE INDEX api_keys_by_project ON api_keys (project);
-- Servers starting together on one database make one first operator key between them.
CREATE UNIQUE INDEX api_keys_one_bootstrap ON api_keys (created_by) WHERE created_by = 'bootstrap';

CREATE TABLE join_tokens (
    id            TEXT   PRIMARY KEY,
    secret_sha256 BYTEA  NOT NULL,
    -- JSON object: labels forced onto the node the token enrols.
    labels        TEXT   NOT NULL,
    created_ms    BIGINT NOT NULL,
    expires_ms    BIGINT NOT NULL,
    used_ms       BIGINT,
    used_by       TEXT,
    created_by    TEXT   NOT NULL
);

CREATE TABLE node_credentials (
    id            TEXT   PRIMARY KEY,
    secret_sha256 BYTEA  NOT NULL,
    node_name     TEXT   NOT NULL,
    -- JSON object, copied from the join token.
    labels        TEXT   NOT NULL,
    created_ms    BIGINT NOT NULL,
    revoked_ms    BIGINT
);
-- One credential in force per node name: what makes a name taken. Concurrent enrolments of
-- one name meet here (the second waits for the first to commit, then conflicts).
CREATE UNIQUE INDEX node_credentials_in_force ON node_credentials (node_name) WHERE revoked_ms IS NULL;

-- Which projects hold which blobs (uploads, artifacts, log archives): a blob is readable by
-- the projects that hold it and by nodes running their attempts.
CREATE TABLE project_blobs (
    project    TEXT   NOT NULL,
    digest     TEXT   NOT NULL,
    size       BIGINT NOT NULL,
    created_ms BIGINT NOT NULL,
    PRIMARY KEY (project, digest)
);
CREATE INDEX project_blobs_by_digest ON project_blobs (digest);
INSERT INTO project_blobs (project, digest, size, created_ms)
    SELECT j.project, a.digest, MAX(a.size), MIN(a.created_ms)
    FROM artifacts a JOIN jobs j ON j.id = a.job_id GROUP BY j.project, a.digest
    ON CONFLICT (project, digest) DO NOTHING;
INSERT INTO project_blobs (project, digest, size, created_ms)
    SELECT j.project, a.log_digest, MAX(a.log_size), COALESCE(MIN(a.log_archived_ms), 0)
    FROM attempts a JOIN jobs j ON j.id = a.job_id WHERE a.log_digest <> '' GROUP BY j.project, a.log_digest
    ON CONFLICT (project, digest) DO NOTHING;

-- Registration epochs are unique across all nodes, not just per node, so an attempt's
-- (id, epoch) names the one node session it belongs to. Starts above every epoch handed out
-- before this migration.
CREATE SEQUENCE node_epochs;
SELECT setval('node_epochs', COALESCE((SELECT MAX(epoch) FROM nodes), 0) + 1, false);
