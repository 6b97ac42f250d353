-- Named queries of the change feed (service/feed.py): the listener, history reads for
-- streams, and the sequencer. Reads of events always carry realtime.sequencer's
-- pruned_through from the SAME statement (one snapshot): prune deletes rows and raises it in
-- one transaction, so a reader either has the rows or knows they are gone.

-- name: read_events
-- The listener: events after $1 (at most $2) and the pruned watermark; one row even if none.
-- An event is its position (realtime.events) joined to the change it numbers; the payload
-- is assembled here, as text (realtime.payload_v3). The positions are cut first (a range of
-- the primary key) and each change is then fetched by its (xid, id) index: OFFSET 0 keeps
-- the lateral subquery from being flattened into a join the planner may run as a hash join
-- over every retained change (a generic plan does not know how few positions follow $1).
SELECT s.pruned_through, e.position, e.topics, e.type, e.tbl, e.payload, e.created_at
FROM realtime.sequencer s
LEFT JOIN LATERAL (
    SELECT p.position,
           CASE WHEN c.old_topic IS NULL THEN ARRAY[c.topic] ELSE ARRAY[c.topic, c.old_topic] END AS topics,
           c.type, c.tbl, realtime.payload_v3(c.op, c.tbl, c.topic, c.data, c.old, c.created_at) AS payload,
           extract(epoch FROM c.created_at)::float8 AS created_at
    FROM (SELECT position, xid, id FROM realtime.events
          WHERE position > $1 ORDER BY position LIMIT $2) p
    CROSS JOIN LATERAL (SELECT * FROM realtime.changes c
                        WHERE c.xid = p.xid AND c.id = p.id OFFSET 0) c
    ORDER BY p.position
) e ON true
WHERE s.id = 1

-- name: replay_events
-- A stream catching up from history: events in ($1, $2], at most $3, and the watermark.
SELECT s.pruned_through, e.position, e.topics, e.type, e.tbl, e.payload, e.created_at
FROM realtime.sequencer s
LEFT JOIN LATERAL (
    SELECT p.position,
           CASE WHEN c.old_topic IS NULL THEN ARRAY[c.topic] ELSE ARRAY[c.topic, c.old_topic] END AS topics,
           c.type, c.tbl, realtime.payload_v3(c.op, c.tbl, c.topic, c.data, c.old, c.created_at) AS payload,
           extract(epoch FROM c.created_at)::float8 AS created_at
    FROM (SELECT position, xid, id FROM realtime.events
          WHERE position > $1 AND position <= $2 ORDER BY position LIMIT $3) p
    CROSS JOIN LATERAL (SELECT * FROM realtime.changes c
                        WHERE c.xid = p.xid AND c.id = p.id OFFSET 0) c
    ORDER BY p.position
) e ON true
WHERE s.id = 1

-- name: sequencer_bounds
-- The head (last position handed out) and the pruned watermark.
SELECT last_position, pruned_through FROM realtime.sequencer WHERE id = 1

-- name: event_by_position
-- One retained event, whole (GET /events/<position>).
SELECT p.position,
       CASE WHEN c.old_topic IS NULL THEN ARRAY[c.topic] ELSE ARRAY[c.topic, c.old_topic] END AS topics,
       c.type, realtime.payload_v3(c.op, c.tbl, c.topic, c.data, c.old, c.created_at) AS payload
FROM realtime.events p
CROSS JOIN LATERAL (SELECT * FROM realtime.changes c
                    WHERE c.xid = p.xid AND c.id = p.id OFFSET 0) c
WHERE p.position = $1 AND c.topic <> ''  -- '': an internal marker (migration 005), no event

-- name: register_reader
-- This process's listener has read up to $2: automatic pruning keeps what is after it.
INSERT INTO realtime.readers (name, position, seen_at) VALUES ($1, $2, clock_timestamp())
ON CONFLICT (name) DO UPDATE SET position = EXCLUDED.position, seen_at = EXCLUDED.seen_at

-- name: key_columns
-- Each watched table's key columns (a truncated event carries the key).
SELECT n.nspname || '.' || c.relname AS tbl, w.key_columns
FROM realtime.watches w JOIN pg_class c ON c.oid = w.tbl
JOIN pg_namespace n ON n.oid = c.relnamespace

-- name: try_lead
-- Session advisory lock: one sequencer per database ($1 = Lock.SEQUENCER_LEADER).
SELECT pg_try_advisory_lock($1)

-- name: sequence
-- Number up to $1 committed changes; returns how many.
SELECT realtime.sequence_v3($1)

-- name: set_wake_writers
-- Whether writers send a payload-free NOTIFY (the sequencer is idle and waits for one).
-- Writers read the sequence; the column says the same to people and older versions.
WITH flag AS (SELECT setval('realtime.wakeup', CASE WHEN $1::boolean THEN 1 ELSE 0 END))
UPDATE realtime.sequencer SET wake_writers = $1::boolean FROM flag

-- name: prune_target
-- The service's pruning: where it may prune through (older than $1 seconds, never past
-- what a live reader has read), or NULL when nothing is due.
SELECT realtime.prune_target_v6(make_interval(secs => $1))

-- name: prune_step
-- One bounded step towards $1: at most $2 positions, in one transaction. Returns the
-- events removed and where pruned_through now stands.
SELECT removed, pruned_through FROM realtime.prune_step_v6($1, $2)

-- name: sequencing_blocked
-- Why this session could not number changes (read-only, missing privileges), or NULL.
SELECT realtime.sequencing_blocked()

-- name: history_stats
-- For metrics: NOTIFY queue fill, retained events (estimate), age of the oldest.
SELECT pg_notification_queue_usage() AS usage,
       (SELECT reltuples FROM pg_class WHERE oid = 'realtime.events'::regclass) AS rows,
       (SELECT extract(epoch FROM clock_timestamp() - c.created_at)
        FROM (SELECT xid, id FROM realtime.events
              WHERE position > (SELECT pruned_through FROM realtime.sequencer WHERE id = 1)
              ORDER BY position LIMIT 1) p
        JOIN realtime.changes c ON c.xid = p.xid AND c.id = p.id) AS age
