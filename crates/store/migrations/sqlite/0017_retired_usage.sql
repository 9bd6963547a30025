-- What the jobs that retention deleted used, summed per project, so that `drover usage` keeps
-- counting them in its project totals (`retired_metering` keeps their spend by day for budgets).
CREATE TABLE retired_usage (
    project TEXT PRIMARY KEY,
    jobs INTEGER NOT NULL,
    tasks INTEGER NOT NULL,
    attempts INTEGER NOT NULL,
    cpu_seconds REAL NOT NULL,
    wall_ms INTEGER NOT NULL,
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL
);
