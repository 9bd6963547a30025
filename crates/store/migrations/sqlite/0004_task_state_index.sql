-- A job's state is derived from its tasks' states after every change; without this index each
-- derivation reads every task row of the job. Also serves requeueing by current attempt.
CREATE INDEX tasks_by_job_state ON tasks(job_id, state);
CREATE INDEX tasks_by_current_attempt ON tasks(current_attempt);
