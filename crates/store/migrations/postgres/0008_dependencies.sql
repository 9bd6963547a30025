-- Incremental dependency release: a task's end touches its name's group and the tasks waiting
-- on that name, never the whole job (a 20,000-task chain was quadratic).

-- Dependencies (names) of a waiting task not yet satisfied.
ALTER TABLE tasks ADD COLUMN deps_left BIGINT NOT NULL DEFAULT 0;

-- Per job and task name (all frames of an array task share it): frames, frames ended, and the
-- first final state that does not satisfy dependents.
CREATE TABLE task_groups (
    job_id     BIGINT  NOT NULL,
    name       TEXT    NOT NULL,
    frames     BIGINT  NOT NULL,
    ended      BIGINT  NOT NULL DEFAULT 0,
    blocked_by TEXT,
    PRIMARY KEY (job_id, name)
);

-- Which tasks wait on which name.
CREATE TABLE task_deps (
    job_id  BIGINT NOT NULL,
    on_name TEXT   NOT NULL,
    task_id BIGINT NOT NULL,
    PRIMARY KEY (job_id, on_name, task_id)
);

-- Jobs stored before this migration that still have waiting tasks get their rows now.
INSERT INTO task_groups (job_id, name, frames, ended, blocked_by)
SELECT t.job_id, t.name, COUNT(*),
       COUNT(*) FILTER (WHERE t.state IN ('succeeded', 'warning', 'failed', 'skipped', 'cancelled')),
       MIN(CASE WHEN t.state IN ('failed', 'skipped', 'cancelled') THEN t.state END)
FROM tasks t JOIN jobs j ON j.id = t.job_id
WHERE j.has_deps AND j.state IN ('queued', 'running')
GROUP BY t.job_id, t.name;

INSERT INTO task_deps (job_id, on_name, task_id)
SELECT t.job_id, d.value, t.id FROM tasks t, jsonb_array_elements_text(t.plan::jsonb -> 'depends_on') d
WHERE t.state = 'waiting';

UPDATE tasks SET deps_left = (
    SELECT COUNT(*) FROM task_deps d
    JOIN task_groups g ON g.job_id = d.job_id AND g.name = d.on_name
    WHERE d.task_id = tasks.id AND g.ended < g.frames
) WHERE state = 'waiting';
