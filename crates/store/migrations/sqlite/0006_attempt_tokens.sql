-- LLM tokens an attempt's metering proxy counted (agent tasks), for `drover usage`.
ALTER TABLE attempts ADD COLUMN input_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE attempts ADD COLUMN output_tokens INTEGER NOT NULL DEFAULT 0;
-- Usage sums attempts per job.
CREATE INDEX IF NOT EXISTS attempts_by_job ON attempts(job_id);
