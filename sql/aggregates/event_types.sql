-- Retained events by type, with the newest position of each (pgsse's own event log).
-- cache: no-cache
-- ttl: 60s
SELECT type, count(*) AS events, max(position) AS last_position
FROM realtime.events
GROUP BY type
ORDER BY type
