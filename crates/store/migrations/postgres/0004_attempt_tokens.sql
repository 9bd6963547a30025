-- LLM tokens an attempt's metering proxy counted (agent tasks), for `drover usage`.
ALTER TABLE attempts ADD COLUMN input_tokens BIGINT NOT NULL DEFAULT 0;
ALTER TABLE attempts ADD COLUMN output_tokens BIGINT NOT NULL DEFAULT 0;
-- Usage sums attempts per job.
CREATE INDEX attempts_by_job ON attempts(job_id);
