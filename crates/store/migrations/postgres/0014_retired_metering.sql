-- What the attempts of jobs that retention deleted used, summed per project, price version and
-- UTC day of assignment: budgets count a period's spend from it too, so deleting a job does
-- not give its project its money back.
CREATE TABLE retired_metering (
    project TEXT NOT NULL,
    price_version BIGINT NOT NULL,
    day_ms BIGINT NOT NULL,
    core_ms DOUBLE PRECISION NOT NULL,
    byte_ms DOUBLE PRECISION NOT NULL,
    input_tokens BIGINT NOT NULL,
    output_tokens BIGINT NOT NULL,
    PRIMARY KEY (project, price_version, day_ms)
);
