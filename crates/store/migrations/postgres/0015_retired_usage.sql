-- What the jobs that retention deleted used, summed per project, so that `drover usage` keeps
-- counting them in its project totals (`retired_metering` keeps their spend by day for budgets).
CREATE TABLE retired_usage (
    project TEXT PRIMARY KEY,
    jobs BIGINT NOT NULL,
    tasks BIGINT NOT NULL,
    attempts BIGINT NOT NULL,
    cpu_seconds DOUBLE PRECISION NOT NULL,
    wall_ms BIGINT NOT NULL,
    input_tokens BIGINT NOT NULL,
    output_tokens BIGINT NOT NULL
);
