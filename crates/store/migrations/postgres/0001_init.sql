-- Drover's schema, PostgreSQL dialect. Times are milliseconds since the Unix epoch, always
-- given by the servers (never now() of the database), so both backends behave alike.
--
-- Several servers share one database. Writers lock rows in one order to never deadlock:
-- nodes, then attempts, then jobs (in id order), then tasks; see src/postgres.rs.

CREATE TABLE jobs (
    id          BIGSERIAL PRIMARY KEY,
    name        TEXT     NOT NULL,
    project     TEXT     NOT NULL,
    priority    INTEGER  NOT NULL,
    labels      TEXT     NOT NULL,
    source      TEXT     NOT NULL,
    filename    TEXT     NOT NULL,
    state       TEXT     NOT NULL,
    cancelled   BOOLEAN  NOT NULL DEFAULT FALSE,
    has_deps    BOOLEAN  NOT NULL,
    created_ms  BIGINT   NOT NULL,
    ended_ms    BIGINT,
    -- Sequence number of the job's last event; events are numbered 1, 2, 3 ... per job. The
    -- UPDATE that advances it takes the job's row lock, which serialises event writers.
    last_seq    BIGINT   NOT NULL DEFAULT 0
);
CREATE INDEX jobs_active ON jobs (id DESC) WHERE state IN ('queued', 'running');

CREATE TABLE tasks (
    id              BIGSERIAL PRIMARY KEY,
    job_id          BIGINT   NOT NULL REFERENCES jobs (id),
    name            TEXT     NOT NULL,
    frame           BIGINT,
    plan            TEXT     NOT NULL,
    priority        INTEGER  NOT NULL,
    cores           BIGINT   NOT NULL,
    memory          BIGINT   NOT NULL,
    constraints     TEXT     NOT NULL,
    runtime         TEXT     NOT NULL,
    state           TEXT     NOT NULL,
    attempts        BIGINT   NOT NULL DEFAULT 0,
    -- The only attempt whose reports are accepted (fencing).
    current_attempt BIGINT,
    not_before_ms   BIGINT   NOT NULL DEFAULT 0,
    exit_code       INTEGER,
    failure         TEXT,
    reason          TEXT     NOT NULL DEFAULT '',
    node_id         BIGINT,
    started_ms      BIGINT,
    ended_ms        BIGINT,
    cpu_seconds     DOUBLE PRECISION NOT NULL DEFAULT 0,
    peak_memory     BIGINT   NOT NULL DEFAULT 0
);
CREATE INDEX tasks_by_state ON tasks (state, priority DESC, id);
-- The queue: small (only queued tasks), and in the order placement reads it.
CREATE INDEX tasks_queued ON tasks (priority DESC, id) INCLUDE (not_before_ms) WHERE state = 'queued';
CREATE INDEX tasks_by_job ON tasks (job_id, name, frame);
-- Deriving a job's state reads the distinct states of its tasks.
CREATE INDEX tasks_by_job_state ON tasks (job_id, state);

CREATE TABLE attempts (
    id          BIGSERIAL PRIMARY KEY,
    task_id     BIGINT   NOT NULL REFERENCES tasks (id),
    job_id      BIGINT   NOT NULL,
    number      BIGINT   NOT NULL,
    node_id     BIGINT   NOT NULL,
    -- The node's registration epoch when the attempt was handed out or last adopted.
    epoch       BIGINT   NOT NULL,
    -- assigned | running | ended
    state       TEXT     NOT NULL,
    cores       BIGINT   NOT NULL,
    memory      BIGINT   NOT NULL,
    assigned_ms BIGINT   NOT NULL,
    started_ms  BIGINT,
    ended_ms    BIGINT,
    exit_code   INTEGER,
    signal      INTEGER,
    failure     TEXT,
    message     TEXT     NOT NULL DEFAULT '',
    cpu_seconds DOUBLE PRECISION NOT NULL DEFAULT 0,
    peak_memory BIGINT   NOT NULL DEFAULT 0
);
-- Open attempts per node: what a node has reserved, and what to settle when it goes away.
CREATE INDEX attempts_open_by_node ON attempts (node_id) WHERE state <> 'ended';

CREATE TABLE nodes (
    id             BIGSERIAL PRIMARY KEY,
    name           TEXT     NOT NULL UNIQUE,
    state          TEXT     NOT NULL,
    labels         TEXT     NOT NULL,
    cores          BIGINT   NOT NULL,
    memory         BIGINT   NOT NULL,
    runtimes       TEXT     NOT NULL,
    -- Incremented on every registration; part of every attempt's fencing token.
    epoch          BIGINT   NOT NULL,
    lease_until_ms BIGINT   NOT NULL,
    last_seen_ms   BIGINT   NOT NULL
);

CREATE TABLE events (
    job_id    BIGINT   NOT NULL,
    seq       BIGINT   NOT NULL,
    time_ms   BIGINT   NOT NULL,
    kind      TEXT     NOT NULL,
    task_id   BIGINT   NOT NULL DEFAULT 0,
    task_name TEXT     NOT NULL DEFAULT '',
    frame     BIGINT,
    state     TEXT     NOT NULL,
    message   TEXT     NOT NULL DEFAULT '',
    exit_code INTEGER,
    attempt   BIGINT   NOT NULL DEFAULT 0,
    node      TEXT     NOT NULL DEFAULT '',
    PRIMARY KEY (job_id, seq)
);

CREATE TABLE log_lines (
    id         BIGSERIAL PRIMARY KEY,
    job_id     BIGINT   NOT NULL,
    task_id    BIGINT   NOT NULL,
    attempt_id BIGINT   NOT NULL,
    attempt    BIGINT   NOT NULL,
    step       BIGINT   NOT NULL,
    stderr     BOOLEAN  NOT NULL,
    data       BYTEA    NOT NULL
);
CREATE INDEX log_lines_by_job ON log_lines (job_id, id);
