-- Named queries of read replicas and failover (service/replica.py, service/timelines.py).

-- name: observe_timeline
-- The sequencer, on taking the lead: a new timeline (a promoted standby) skips positions
-- past anything the old primary may have numbered, and records the range. Returns the skip.
SELECT realtime.observe_timeline_v1()

-- name: skipped_ranges
-- Ranges of positions never numbered on this history that end after $1 (a cursor).
SELECT skipped_from, skipped_through FROM realtime.timelines
WHERE skipped_through > skipped_from AND skipped_through > $1
ORDER BY skipped_from

-- name: position_skipped
-- Whether position $1 lies in a skipped range (a resume from it gets reset).
SELECT EXISTS (SELECT 1 FROM realtime.timelines
               WHERE $1 > skipped_from AND $1 <= skipped_through) AS skipped

-- name: report_standby_reader
-- A standby-reading process, on the primary: it has read up to $2 (pruning keeps what is
-- after it), and learns the primary's head (its lag). One statement, no feed read.
WITH reader AS (
    INSERT INTO realtime.readers (name, position, seen_at) VALUES ($1, $2, clock_timestamp())
    ON CONFLICT (name) DO UPDATE SET position = EXCLUDED.position, seen_at = EXCLUDED.seen_at
)
SELECT last_position FROM realtime.sequencer WHERE id = 1
