-- What the attempts of jobs that retention deleted used, summed per project, price version and
-- UTC day of assignment: budgets count a period's spend from it too, so deleting a job does
-- not give its project its money back.
CREATE TABLE retired_metering (
    project TEXT NOT NULL,
    price_version INTEGER NOT NULL,
    day_ms INTEGER NOT NULL,
    core_ms REAL NOT NULL,
    byte_ms REAL NOT NULL,
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    PRIMARY KEY (project, price_version, day_ms)
);
