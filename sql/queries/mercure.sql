-- Named queries of the Mercure hub (service/mercure).
-- A block starts with "-- name: <name>"; the comment lines after it say what it is for.

-- name: mercure_publish
-- A Mercure update ($1: {"id", "topics", "data", "private", "type", "retry"}), stored as a
-- custom event of the reserved topic _mercure: one transaction, numbered like any event.
SELECT realtime.publish('_mercure', 'mercure', $1::jsonb)

-- name: mercure_position
-- The position of the retained Mercure update with publisher id $1 (the newest such).
SELECT e.position FROM realtime.changes c
JOIN realtime.events e ON e.xid = c.xid AND e.id = c.id
WHERE c.topic = '_mercure' AND c.data->>'id' = $1
ORDER BY e.position DESC LIMIT 1
