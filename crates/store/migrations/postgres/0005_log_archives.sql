-- An ended attempt's log moves into one blob; its digest replaces the live rows. An empty
-- digest marks an archive dropped after the retention period.
ALTER TABLE attempts ADD COLUMN log_digest TEXT;
ALTER TABLE attempts ADD COLUMN log_size BIGINT NOT NULL DEFAULT 0;
ALTER TABLE attempts ADD COLUMN log_archived_ms BIGINT;
CREATE INDEX attempts_unarchived ON attempts (id) WHERE state = 'ended' AND log_digest IS NULL;
CREATE INDEX attempts_by_log_archived ON attempts (log_archived_ms) WHERE log_digest <> '';
CREATE INDEX attempts_by_log_digest ON attempts (log_digest) WHERE log_digest <> '';
CREATE INDEX IF NOT EXISTS attempts_by_job ON attempts (job_id);
CREATE INDEX log_lines_by_attempt ON log_lines (attempt_id, id);
CREATE INDEX artifacts_by_digest ON artifacts (digest);
