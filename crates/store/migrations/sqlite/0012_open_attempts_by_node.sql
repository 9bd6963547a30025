-- Open attempts per node, as on PostgreSQL. The index on (node_id, state) it replaces held every
-- attempt a node ever ran, and `state != 'ended'` is no range of it: summing a node's open
-- reservations, which every assignment round does, read all of them, so rounds slowed down as a
-- job grew (a 100,000-task array ran its last tenth at half the rate of its first).
DROP INDEX attempts_open_by_node;
CREATE INDEX attempts_open_by_node ON attempts(node_id) WHERE state <> 'ended';
