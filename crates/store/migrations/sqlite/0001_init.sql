-- Drover's schema, SQLite dialect. Times are milliseconds since the Unix epoch.

CREATE TABLE jobs (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT    NOT NULL,
    project     TEXT    NOT NULL,
    priority    INTEGER NOT NULL,
    labels      TEXT    NOT NULL,
    source      TEXT    NOT NULL,
    filename    TEXT    NOT NULL,
    state       TEXT    NOT NULL,
    cancelled   INTEGER NOT NULL DEFAULT 0,
    has_deps    INTEGER NOT NULL,
    created_ms  INTEGER NOT NULL,
    ended_ms    INTEGER,
    -- Sequence number of the job's last event; events are numbered 1, 2, 3 ... per job.
    last_seq    INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE tasks (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id          INTEGER NOT NULL REFERENCES jobs(id),
    name            TEXT    NOT NULL,
    frame           INTEGER,
    plan            TEXT    NOT NULL,
    priority        INTEGER NOT NULL,
    cores           INTEGER NOT NULL,
    memory          INTEGER NOT NULL,
    constraints     TEXT    NOT NULL,
    runtime         TEXT    NOT NULL,
    state           TEXT    NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    -- The only attempt whose reports are accepted (fencing).
    current_attempt INTEGER,
    not_before_ms   INTEGER NOT NULL DEFAULT 0,
    exit_code       INTEGER,
    failure         TEXT,
    reason          TEXT    NOT NULL DEFAULT '',
    node_id         INTEGER,
    started_ms      INTEGER,
    ended_ms        INTEGER,
    cpu_seconds     REAL    NOT NULL DEFAULT 0,
    peak_memory     INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX tasks_by_state ON tasks(state, priority DESC, id);
CREATE INDEX tasks_by_job ON tasks(job_id, name, frame);

CREATE TABLE attempts (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id     INTEGER NOT NULL REFERENCES tasks(id),
    job_id      INTEGER NOT NULL,
    number      INTEGER NOT NULL,
    node_id     INTEGER NOT NULL,
    -- The node's registration epoch when the attempt was handed out or last adopted.
    epoch       INTEGER NOT NULL,
    -- assigned | running | ended
    state       TEXT    NOT NULL,
    cores       INTEGER NOT NULL,
    memory      INTEGER NOT NULL,
    assigned_ms INTEGER NOT NULL,
    started_ms  INTEGER,
    ended_ms    INTEGER,
    exit_code   INTEGER,
    signal      INTEGER,
    failure     TEXT,
    message     TEXT    NOT NULL DEFAULT '',
    cpu_seconds REAL    NOT NULL DEFAULT 0,
    peak_memory INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX attempts_open_by_node ON attempts(node_id, state);

CREATE TABLE nodes (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    name           TEXT    NOT NULL UNIQUE,
    state          TEXT    NOT NULL,
    labels         TEXT    NOT NULL,
    cores          INTEGER NOT NULL,
    memory         INTEGER NOT NULL,
    runtimes       TEXT    NOT NULL,
    -- Incremented on every registration; part of every attempt's fencing token.
    epoch          INTEGER NOT NULL,
    lease_until_ms INTEGER NOT NULL,
    last_seen_ms   INTEGER NOT NULL
);

CREATE TABLE events (
    job_id    INTEGER NOT NULL,
    seq       INTEGER NOT NULL,
    time_ms   INTEGER NOT NULL,
    kind      TEXT    NOT NULL,
    task_id   INTEGER NOT NULL DEFAULT 0,
    task_name TEXT    NOT NULL DEFAULT '',
    frame     INTEGER,
    state     TEXT    NOT NULL,
    message   TEXT    NOT NULL DEFAULT '',
    exit_code INTEGER,
    attempt   INTEGER NOT NULL DEFAULT 0,
    node      TEXT    NOT NULL DEFAULT '',
    PRIMARY KEY (job_id, seq)
) WITHOUT ROWID;

CREATE TABLE log_lines (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id     INTEGER NOT NULL,
    task_id    INTEGER NOT NULL,
    attempt_id INTEGER NOT NULL,
    attempt    INTEGER NOT NULL,
    step       INTEGER NOT NULL,
    stderr     INTEGER NOT NULL,
    data       BLOB    NOT NULL
);
CREATE INDEX log_lines_by_job ON log_lines(job_id, id);
