-- An upload no job ever named was kept for good: nothing orphaned it. Such blobs are now
-- marked unreferenced when they are stored, and those stored before are marked from now, so
-- collection takes them after the grace unless a job names them meanwhile.
INSERT INTO unreferenced_blobs (digest, since_ms)
SELECT DISTINCT pb.digest, (EXTRACT(EPOCH FROM now()) * 1000)::BIGINT FROM project_blobs pb
WHERE NOT EXISTS (SELECT 1 FROM artifacts WHERE digest = pb.digest)
  AND NOT EXISTS (SELECT 1 FROM attempts WHERE log_digest = pb.digest)
  AND NOT EXISTS (SELECT 1 FROM job_blobs WHERE digest = pb.digest)
ON CONFLICT (digest) DO NOTHING;
